"""The task interface (tasks/base.py, lm.py, passkey.py): windows, resume, evaluation."""

import json
import subprocess
import sys

import numpy as np
import torch

from memformers.config import load_config
from memformers.data.tokenizer import ByteTokenizer
from memformers.tasks.base import build_task
from memformers.tasks.passkey import PasskeyTask
from memformers.train.trainer import Trainer
from tests.conftest import TINY_MODEL

PASSKEY = [*TINY_MODEL, "task.name=passkey", "task.lengths=[300, 360]",
           "task.eval_lengths=[300]", "task.eval_depths=[0.5]", "task.eval_samples=2",
           "train.bptt_segments=2"]


def test_passkey_windows_score_only_the_answer_and_train_the_last_segments():
    cfg = load_config(None, PASSKEY)
    task = build_task(cfg, ByteTokenizer())
    assert isinstance(task, PasskeyTask)
    for _ in range(4):
        segs = task.next_window()
        assert len(segs) in (10, 12)  # 300 or 360 tokens in segments of 32
        assert [s.grad for s in segs] == [False] * (len(segs) - 2) + [True, True]
        assert segs[0].new_doc.all() and not any(s.new_doc.any() for s in segs[1:])
        scored = torch.cat([s.targets for s in segs], 1) != -100
        assert 0 < int(scored.sum(1)[0]) <= 8  # the answer's tokens only, at the end
        assert not scored[:, :250].any()


def test_passkey_task_resumes_where_it_stood():
    cfg = load_config(None, PASSKEY)
    a = build_task(cfg, ByteTokenizer())
    a.next_window()
    state = json.loads(json.dumps(a.state_dict()))
    want = [s.tokens for s in a.next_window()]
    b = build_task(cfg, ByteTokenizer())
    b.load_state_dict(state)
    got = [s.tokens for s in b.next_window()]
    assert len(got) == len(want) and all(torch.equal(x, y) for x, y in zip(got, want))


def test_train_task_passkey_end_to_end(tmp_path):
    run = tmp_path / "run"
    sets = [x for s in [*PASSKEY, "train.steps=4", "train.ckpt_every=2",
                        f"data.corpus=\"{tmp_path / 'none'}\""] for x in ("--set", s)]
    res = subprocess.run([sys.executable, "-m", "memformers", "train", "--run-dir", str(run),
                          "--no-progress", *sets], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "passkey exact match" in res.stdout and "byte tokenizer" in res.stderr + res.stdout
    ev = json.loads((run / "eval.json").read_text())
    assert ev["lengths"] == [300] and np.shape(ev["accuracy"]) == (1, 1)
    assert (run / "eval.png").is_file() and (run / "model.safetensors").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    assert all(0 < x["tokens"] <= 4 * 2 * 8 for x in lines[:1])  # answer tokens only


def test_lm_task_window_is_bptt_segments_of_the_corpus(tiny_corpus, tmp_path):
    cfg = load_config(None, [*TINY_MODEL, f"data.corpus=\"{tiny_corpus}\"",
                             "train.bptt_segments=3"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    segs = trainer.task.next_window()
    assert len(segs) == 3 and all(s.tokens.shape == (2, 32) for s in segs)
    assert segs[0].new_doc.all()
    assert torch.equal(segs[0].targets[:, :-1], segs[0].tokens[:, 1:])  # next tokens
    trainer.close()


def test_passkey_lengths_too_short_for_the_prompt_are_refused(tmp_path):
    res = subprocess.run([sys.executable, "-m", "memformers", "train", "--task", "passkey",
                          "--run-dir", str(tmp_path / "run"), "--set", "task.lengths=[100]",
                          "--set", f"data.corpus=\"{tmp_path / 'none'}\""],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "task.lengths: passkey length" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()
