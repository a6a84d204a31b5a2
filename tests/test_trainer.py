import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memformers.config import load_config
from memformers.evaluate.lm import format_eval
from memformers.train.optim import lr_factor
from memformers.train.trainer import Trainer
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


def test_lr_schedule_warmup_then_cosine():
    cfg = load_config(None, ["train.steps=100", "train.warmup_steps=10",
                             "train.min_lr_ratio=0.1"]).train
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(55, cfg) == pytest.approx(0.55)
