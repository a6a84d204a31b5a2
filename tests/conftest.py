"""Shared fixtures: a tiny corpus built from real standard-library text."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

TINY_MODEL = [
    "model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.head_dim=8",
    "model.d_ff=64", "data.segment_len=32", "data.batch_size=2", "data.eval_max_docs=4",
    "train.warmup_steps=2", "train.log_every=1", "train.lr=3e-3",
]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    from memformers.data.corpus import build_corpus

    src = tmp_path_factory.mktemp("text")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["bisect.py", "colorsys.py", "keyword.py", "this.py", "heapq.py", "abc.py",
                 "glob.py", "fnmatch.py", "shlex.py", "textwrap.py", "copy.py", "stat.py"]:
        text = (stdlib / name).read_text()[:6000]
        (src / name.replace(".py", ".txt")).write_text(text)
    out = tmp_path_factory.mktemp("corpus") / "tiny"
    build_corpus(out, str(src), tokenizer="byte", split=(0.6, 0.2, 0.2), progress=False)
    return out


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny test models run 10-40x slower when two threads fight on a busy 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
