import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memformers.config import ModelConfig, load_config
from memformers.evaluate.lm import format_eval
from memformers.memory.configs import InfiniConfig, KNNConfig
from memformers.memory.state import collect_state_tensors
from memformers.model import MemformerLM
from memformers.runner import Segment
from memformers.train.optim import lr_factor
from memformers.train.trainer import Trainer, TrainWindow
from tests.conftest import TINY_MODEL


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "memformers", *args]


def _train_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    sets = [*TINY_MODEL, f"data.corpus=\"{corpus}\"", "model.xl_cache=true",
            "model.d_model=64", "model.d_ff=256", "data.segment_len=128", *extra]
    out = ["train", "--run-dir", str(run_dir), "--no-progress"]
    for s in sets:
        out += ["--set", s]
    return out


def test_training_lowers_loss_and_evaluates(tiny_corpus, tmp_path):
    cfg = load_config(None, [*TINY_MODEL, f"data.corpus=\"{tiny_corpus}\"", "train.steps=40",
                             "model.xl_cache=true", "train.ckpt_every=0"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    before = trainer.evaluate()
    trainer.run()
    after = trainer.evaluate()
    assert after["loss"] < before["loss"] - 0.5
    assert after["tokens"] == before["tokens"] > 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 40


def test_pkm_run_resolves_sparse_for_cpu_and_reports_slot_usage(tiny_corpus, tmp_path):
    cfg = load_config(None, [*TINY_MODEL, f"data.corpus=\"{tiny_corpus}\"", "train.steps=3",
                             "train.ckpt_every=0", "model.pkm.layers=[1]", "model.pkm.n_keys=8",
                             "model.pkm.k_dim=8", "model.pkm.heads=2", "model.pkm.top_k=2"])
    assert cfg.model.pkm.sparse == "auto"
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    pkm = trainer.model.blocks[1].ffn
    assert cfg.model.pkm.sparse is True and pkm.values.sparse  # CPU: sparse is faster
    trainer.run()
    ev = trainer.evaluate()
    usage = ev["pkm_usage"]["blocks.1.ffn"]
    assert usage["tokens"] == ev["tokens"] and usage["slots"] == 64
    assert 0 < usage["used"] <= 1 and usage["slots_50"] <= usage["slots_90"] <= usage["slots_99"]
    assert "product keys blocks.1.ffn" in format_eval(ev)


def test_periodic_eval_also_measures_the_memory_off_and_logs_trajectories(tiny_corpus,
                                                                          tmp_path):
    cfg = load_config(None, [*TINY_MODEL, f"data.corpus=\"{tiny_corpus}\"", "train.steps=4",
                             "train.ckpt_every=0", "train.eval_every=2", "train.log_every=2",
                             "model.xl_cache=true", "model.knn.layers=[1]",
                             "model.knn.capacity=256", "data.eval_max_docs=1"])
    Trainer(cfg, tmp_path / "run", progress=False).run()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "eval" in r]
    assert [r["step"] for r in evals] == [2]  # the last step's eval is the final one
    on, off = evals[0]["eval"], evals[0]["eval_memory_off"]
    assert on["tokens"] == off["tokens"] and on["loss"] != off["loss"]
    assert "knn_retrieval" in on and "knn_retrieval" not in off  # off: nothing retrieved
    logged = [r for r in recs if "gates" in r]
    assert logged and all(len(r["scales"]["blocks.1"]) == 4 for r in logged)


def test_periodic_eval_measures_key_staleness_without_changing_the_training(tiny_corpus,
                                                                           tmp_path):
    sets = [*TINY_MODEL, f"data.corpus=\"{tiny_corpus}\"", "train.steps=5",
            "train.ckpt_every=0", "train.eval_every=2", "model.xl_cache=true",
            "model.knn.layers=[1]", "model.knn.capacity=256", "data.eval_max_docs=1",
            "train.staleness_segments=3"]
    Trainer(load_config(None, sets), tmp_path / "on", progress=False).run()
    recs = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    probes = [r["key_overlap"] for r in recs if "key_overlap" in r]
    assert [p["age_steps"] for p in probes] == [2, 2]
    assert all(len(p["blocks.1"]) == 4 and all(0 <= x <= 1 for x in p["blocks.1"])
               for p in probes)
    Trainer(load_config(None, [*sets, "train.staleness_segments=0"]), tmp_path / "off",
            progress=False).run()
    on, off = (load_file(tmp_path / r / "model.safetensors") for r in ("on", "off"))
    assert all(torch.equal(on[k], off[k]) for k in on)


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_corpus, tmp_path):
    steps = "train.steps=24"
    full = subprocess.run(_cli(*_train_args(tiny_corpus, tmp_path / "a", steps,
                                            "train.ckpt_every=0")),
                          capture_output=True, text=True)
    assert full.returncode == 0, full.stderr

    run_b = tmp_path / "b"
    proc = subprocess.Popen(_cli(*_train_args(tiny_corpus, run_b, steps, "train.ckpt_every=3")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((run_b / "checkpoints").glob("step_0000006")) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_b / "model.safetensors").exists()  # really interrupted

    resumed = subprocess.run(_cli("train", "--run-dir", str(run_b), "--resume", "--no-progress"),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(run_b / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_torn_checkpoint_is_never_loaded(tiny_corpus, tmp_path):
    cfg = load_config(None, [*TINY_MODEL, f"data.corpus=\"{tiny_corpus}\"", "train.steps=4",
                             "train.ckpt_every=2"])
    Trainer(cfg, tmp_path / "r", progress=False).run()
    torn = tmp_path / "r" / "checkpoints" / "step_0000009"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"garbage")
    cfg.train.steps = 6
    t = Trainer(cfg, tmp_path / "r", resume=True, progress=False)
    assert t.step == 4


def test_describe_prints_the_per_stream_state_of_each_memory(tiny_corpus, tmp_path):
    cfg = load_config(None, [*TINY_MODEL, f"data.corpus=\"{tiny_corpus}\"", "train.steps=1",
                             "model.infini.layers=[0, 1]", "model.xl_cache=true"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    text = trainer.describe()
    m = cfg.model
    infini = int(re.search(r"infini ([\d,]+) B", text).group(1).replace(",", ""))
    assert infini == 2 * m.n_heads * m.head_dim * (m.head_dim + 1) * 4  # L x H x dk x (dv+1) x 4
    memories = [b.attn.memory for b in trainer.model.blocks]
    assert infini == sum(t[0].numel() * t.element_size()  # what the tensors really hold
                         for mem in memories for t in mem.state_tensors().values())
    xl = int(re.search(r"xl_cache ([\d,]+) B", text).group(1).replace(",", ""))
    trainer.train_window()  # the cache is empty until the first segment is written
    assert xl == sum(b.attn.cache.state_bytes_per_stream() for b in trainer.model.blocks) > 0
    assert f"in all {infini + xl:,} B per stream" in text


def test_lr_schedule_warmup_then_cosine():
    cfg = load_config(None, ["train.steps=100", "train.warmup_steps=10",
                             "train.min_lr_ratio=0.1"]).train
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(55, cfg) == pytest.approx(0.55)


# --------------------------------------------------------------------------- BPTT windows


def tiny_lm(**kw) -> MemformerLM:
    torch.manual_seed(0)
    return MemformerLM(ModelConfig(n_layers=2, d_model=32, n_heads=4, head_dim=8, d_ff=64,
                                   vocab_size=50, **kw))


def window_segments(n: int, B: int = 2, L: int = 16, seed: int = 1) -> list[Segment]:
    """n segments; stream 1 starts a new document in segment 2
    and the last segment is partly padding."""
    g = torch.Generator().manual_seed(seed)
    segs = []
    for s in range(n):
        mask = torch.ones(B, L, dtype=torch.bool)
        if s == n - 1:
            mask[0, L // 2:] = False
        targets = torch.randint(0, 50, (B, L), generator=g).masked_fill(~mask, -100)
        segs.append(Segment(torch.randint(0, 50, (B, L), generator=g), targets, mask,
                            torch.tensor([s == 0, s in (0, 2)])))
    return segs


def run_windows(model, segs, bptt: int, checkpoint: bool):
    """The trainer's loop: windows of ``bptt`` segments, one backward each, then detach."""
    torch.manual_seed(5)  # same dropout masks in both runs
    window = TrainWindow(model, nullcontext(), checkpoint_activations=checkpoint)
    losses = []
    for i in range(0, len(segs), bptt):
        total, _ = window(segs[i:i + bptt])
        total.backward()
        model.detach_state()
        losses.append(total.detach())
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return torch.stack(losses), grads, collect_state_tensors(model)


@pytest.mark.parametrize("kw", [
    dict(infini=InfiniConfig(layers=[0, 1], update="delta"), position="rope", dropout=0.1),
    dict(xl_cache=True, knn=KNNConfig(layers=[1], capacity=24, top_k=4)),
], ids=["infini", "xl+knn"])
def test_checkpoint_activations_changes_nothing_but_memory(kw):
    model = tiny_lm(**kw)
    segs = window_segments(6)
    (loss_a, grads_a, state_a), (loss_b, grads_b, state_b) = (
        run_windows(copy.deepcopy(model), segs, bptt=3, checkpoint=ck) for ck in (False, True))
    assert torch.allclose(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(model.parameters()))
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name
    assert state_a.keys() == state_b.keys() and state_a
    for name in state_a:  # the recomputation wrote nothing twice
        assert torch.equal(state_a[name], state_b[name]), name
    if "knn" in kw:  # each real token written once since the stream's last new document
        assert state_b["blocks.1.attn.memory.count"].tolist() == [6 * 16 - 8, 4 * 16]


def test_checkpoint_activations_saves_no_activations_for_backward():
    """Bytes autograd keeps for backward during a 3-segment window: with checkpointing
    only the loss's own (the logits' log-softmax) remain; the segments' are recomputed."""

    def saved_bytes(checkpoint: bool) -> int:
        model = tiny_lm(infini=InfiniConfig(layers=[0, 1]))
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        window = TrainWindow(model, nullcontext(), checkpoint_activations=checkpoint)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            total, _ = window(window_segments(3, L=64))
        total.backward()
        return sum(storages.values())

    plain, ckpt = saved_bytes(False), saved_bytes(True)
    print(f"saved for backward: {plain:,} B plain, {ckpt:,} B checkpointed")
    assert ckpt * 10 < plain
