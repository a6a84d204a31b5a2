from collections import Counter
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from memformers.config import load_config
from memformers.errors import MemformersError
from memformers.tasks import sorting
from memformers.tasks.sorting import (
    SortingTask,
    drifting_sequence,
    make_sorting_example,
    segments_needing_grad,
    sort_by_frequency,
    sorting_segments,
    target_accuracy,
    train_sorting,
)
from tests.conftest import TINY_MODEL


def brute_sort(seq, vocab):
    """The official generator's rule: Counter.most_common keeps first-insertion order on ties."""
    order = [s for s, _ in Counter(int(x) for x in seq).most_common()]
    return order + [s for s in range(vocab) if s not in order]


def test_targets_on_hand_made_examples():
    # 3 x2, 1 x2 (3 first), 0 x1 ... ties by first appearance; absent appended increasing
    seq = np.array([3, 1, 0, 3, 1, 4])
    assert sort_by_frequency(seq, 6).tolist() == [3, 1, 0, 4, 2, 5]
    assert sort_by_frequency(np.array([5, 4, 4, 5, 2]), 6).tolist() == [5, 4, 2, 0, 1, 3]
    assert sort_by_frequency(np.array([0]), 3).tolist() == [0, 1, 2]


def test_targets_match_counter_reference():
    rng = np.random.default_rng(1)
    for length in (1, 5, 37, 300):
        seq, target = make_sorting_example(length, rng)
        assert seq.shape == (length,) and target.shape == (20,)
        assert target.tolist() == brute_sort(seq, 20)
        assert sorted(target.tolist()) == list(range(20))


def test_distribution_drifts_from_initial_to_final():
    rng = np.random.default_rng(0)
    T, V = 2000, 20
    corr_first, corr_last, corr_cross = [], [], []
    for _ in range(20):
        p0 = rng.integers(1, 10, V) / 1.0
        p0 /= p0.sum()
        p1 = rng.integers(1, 10, V) / 1.0
        p1 /= p1.sum()
        seq = drifting_sequence(T, p0, p1, rng)
        f_first = np.bincount(seq[: T // 4], minlength=V)
        f_last = np.bincount(seq[-T // 4:], minlength=V)
        corr_first.append(np.corrcoef(f_first, p0)[0, 1])
        corr_last.append(np.corrcoef(f_last, p1)[0, 1])
        corr_cross.append(np.corrcoef(f_first, p1)[0, 1])
    # the first quarter follows p_initial, the last p_final; not the other way round
    assert np.mean(corr_first) > 0.6 and np.mean(corr_last) > 0.6
    assert np.mean(corr_cross) < np.mean(corr_first) - 0.3


def test_sampler_matches_the_mixture_probabilities():
    rng = np.random.default_rng(3)
    p = np.arange(1, 6, dtype=float)
    p /= p.sum()
    seq = drifting_sequence(50000, p, p, rng)  # no drift: i.i.d. from p
    freq = np.bincount(seq, minlength=5) / len(seq)
    assert np.abs(freq - p).max() < 0.01


def test_deterministic_per_seed():
    a = make_sorting_example(100, np.random.default_rng(7))
    b = make_sorting_example(100, np.random.default_rng(7))
    c = make_sorting_example(100, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_lm_layout_scores_only_the_target():
    task = SortingTask(length=30)
    inputs, labels = task.lm_example(np.random.default_rng(0))
    seq, target = make_sorting_example(30, np.random.default_rng(0))
    assert task.vocab_size == 21 and inputs.shape == labels.shape == (30 + 20,)
    assert inputs[:30].tolist() == seq.tolist() and inputs[30] == task.sep
    assert inputs[31:].tolist() == target[:-1].tolist()
    assert (labels[:30] == -100).all() and labels[30:].tolist() == target.tolist()
    x, y = task.batch(3, np.random.default_rng(0))
    assert x.shape == (3, 50) and x.max() <= 20
    pred = np.where(y == -100, 0, y)
    pred[1, 35] = (pred[1, 35] + 1) % 20  # one wrong target symbol out of 3 x 20
    assert target_accuracy(pred, y) == pytest.approx(1 - 1 / 60)
    with pytest.raises(MemformersError):
        make_sorting_example(0, np.random.default_rng(0))


# --------------------------------------------------------------------------- training on it


def test_only_the_target_segments_are_scored():
    # T=100 + 20 targets = 120 positions in segments of 32: the targets (100..119) are in #3
    assert sorting_segments(SortingTask(100), 32) == (4, [False, False, False, True])
    # T=60: targets 60..79 straddle segments #1 (32..63) and #2 (64..95)
    assert sorting_segments(SortingTask(60), 32) == (3, [False, True, True])


def test_segments_needing_grad_follow_the_bptt_window():
    scored = [False, False, False, True, True]
    assert segments_needing_grad(scored, 1) == [False, False, False, True, True]
    # blocks [0 1] [2 3] [4]: #2 shares a block with scored #3
    assert segments_needing_grad(scored, 2) == [False, False, True, True, True]
    assert segments_needing_grad(scored, 3) == [False, False, False, True, True]
    assert segments_needing_grad(scored, 8) == [True] * 5
    # a segment after the last scored one reaches no loss
    assert segments_needing_grad([True, False], 2) == [True, False]


def _train_weights(cfg) -> dict[str, torch.Tensor]:
    # One attention kernel for both code paths: on CPU, PyTorch's scaled_dot_product_attention
    # takes its flash kernel when the additive mask needs no gradient (under no_grad) and the
    # math kernel otherwise, which differ in the last bits (~1e-7).
    with sdpa_kernel(SDPBackend.MATH):
        model, _ = train_sorting(cfg, 150, 3, torch.device("cpu"), nullcontext(), progress=False)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_no_grad_segments_train_exactly_the_same_weights(monkeypatch):
    """Running the unscored segments under no_grad changes nothing but the speed.

    T=150 in segments of 32: 6 segments, targets in #4 and #5; BPTT blocks [0 1 2] [3 4 5],
    so #3 needs its graph (Infini-attention's state is not detached inside a block) and
    #0-#2 do not. Every memory kind is in the model: XL cache, kNN, continuous (sticky),
    Infini-attention. The reference runs every segment with autograd (the old code path).
    """
    cfg = load_config(None, [*TINY_MODEL, "model.n_layers=3", "model.xl_cache=true",
                             "model.knn.layers=[0]", "model.knn.capacity=256",
                             "model.continuous.layers=[1]", "model.continuous.n_basis=16",
                             "model.continuous.n_samples=16", "model.infini.layers=[2]",
                             "train.bptt_segments=3"])
    assert segments_needing_grad(sorting_segments(SortingTask(150), 32)[1], 3) == \
        [False, False, False, True, True, True]
    fast = _train_weights(cfg)
    with monkeypatch.context() as m:  # the old code path: autograd on every segment
        m.setattr(sorting, "segments_needing_grad", lambda scored, window: [True] * len(scored))
        reference = _train_weights(cfg)
    with monkeypatch.context() as m:  # a wrong choice (#3 without graph) is caught
        m.setattr(sorting, "segments_needing_grad", lambda scored, window: list(scored))
        wrong = _train_weights(cfg)
    assert fast.keys() == reference.keys()
    for name in fast:
        assert torch.equal(fast[name], reference[name]), name
    assert any(not torch.equal(wrong[n], reference[n]) for n in fast)


def test_collect_sorting_reads_every_run_at_one_step(tmp_path):
    """scripts/collect_sorting.py: one table from per-variant `memformers sorting` runs, each
    read at the same step of its curve (a run stopped early included, one that never got
    there left out); a directory without results.json is a one-line error."""
    import json
    import subprocess
    import sys

    def run_dir(name, record):
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps(record))
        return str(d)

    def point(step, acc):
        return {"step": step, "accuracy": acc, "loss": 2.0, "seconds": 1.0}

    done = run_dir("sort-xl-64", {"steps": 4, "sorting": {"64": {
        "accuracy": 0.3, "loss": 2.0, "curve": [point(2, 0.1), point(4, 0.3)]}}})
    stopped = run_dir("sort-continuous-64", {"steps": 4, "sorting": {},
                                             "in_progress": {"length": 64,
                                                             "curve": [point(2, 0.25)]}})
    short = run_dir("sort-knn-64", {"steps": 4, "sorting": {}, "in_progress": {
        "length": 64, "curve": []}})
    out = tmp_path / "table"
    script = [sys.executable, "scripts/collect_sorting.py"]
    res = subprocess.run([*script, done, stopped, short, "--step", "2", "--out", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "| xl | 10.0% |" in res.stdout and "| continuous | 25.0% |" in res.stdout
    assert "knn" not in res.stdout
    record = json.loads(out.with_suffix(".json").read_text())
    assert [v["name"] for v in record["variants"]] == ["xl", "continuous"]
    assert out.with_suffix(".png").stat().st_size > 1000
    bad = subprocess.run([*script, str(tmp_path), "--out", str(out)], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error:")
    assert len(bad.stderr.strip().splitlines()) == 1
