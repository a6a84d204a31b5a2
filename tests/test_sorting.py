from collections import Counter

import numpy as np
import pytest

from memformers.errors import MemformersError
from memformers.tasks.sorting import (
    SortingTask,
    drifting_sequence,
    make_sorting_example,
    sort_by_frequency,
    target_accuracy,
)


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
