"""memformers.memory.persist: one stream's memories saved, and continued in another model."""

from __future__ import annotations

import json

import pytest
import torch

from memformers.config import ModelConfig
from memformers.errors import MemformersError
from memformers.memory.configs import ContinuousConfig, InfiniConfig, KNNConfig
from memformers.memory.persist import load_memory, save_memory
from memformers.memory.state import collect_state_tensors
from memformers.model import MemformerLM

L = 16  # segment length


def every_memory(seed: int = 0, capacity: int = 64) -> MemformerLM:
    """XL caches in every layer, kNN in layer 0, Infini-attention in 1, continuous in 2."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, n_layers=3, d_model=32, n_heads=4, head_dim=8, d_ff=64,
                      xl_cache=True, knn=KNNConfig(layers=[0], capacity=capacity, top_k=4),
                      infini=InfiniConfig(layers=[1]),
                      continuous=ContinuousConfig(layers=[2], n_basis=16, n_samples=16,
                                                  sticky_bins=8))
    return MemformerLM(cfg).eval()


def feed(model: MemformerLM, tokens: torch.Tensor, first: bool) -> list[torch.Tensor]:
    """Logits of (B, T) tokens fed segment by segment; ``first``: they start documents."""
    out = []
    with torch.no_grad():
        for s in range(tokens.shape[1] // L):
            new_doc = torch.full((tokens.shape[0],), first and s == 0)
            out.append(model(tokens[:, s * L:(s + 1) * L], new_doc=new_doc))
    return out


def test_a_stream_continues_in_another_stream_of_another_model(tmp_path):
    torch.manual_seed(1)
    docs = torch.randint(0, 64, (2, 6 * L))  # stream 0: another document; 1: ours
    half = 3 * L
    a = every_memory()
    feed(a, docs[:, :half], first=True)
    store = a.blocks[0].attn.memory.store
    assert store.count.tolist() == [half, half]  # the kNN memory is in use (FIFO of 64)
    saved = save_memory(a, tmp_path / "doc.mem", stream=1)
    manifest = json.loads((saved / "memory.json").read_text())
    assert manifest["streams"] == 1 and manifest["tokens_written"] == [half]

    b = every_memory()  # a fresh instance with the same weights
    b.allocate_state(2)
    feed(b, torch.randint(0, 64, (2, L)), first=True)  # stream 1 of b: its own document
    before = {k: t[1] for k, t in collect_state_tensors(b).items()}
    load_memory(b, saved, stream=0)
    after = {k: t[1] for k, t in collect_state_tensors(b).items()}
    assert before.keys() == after.keys()
    for k in before:  # stream 1 is untouched (its kNN ring padded to stream 0's fill)
        corner = after[k][tuple(slice(0, n) for n in before[k].shape)]
        assert torch.equal(before[k], corner) and after[k].sum() == corner.sum(), k

    rest_a = feed(a, docs[:, half:], first=False)
    rest_b = feed(b, torch.stack([docs[1, half:], torch.randint(0, 64, (3 * L,))]),
                  first=False)
    for la, lb in zip(rest_a, rest_b):
        assert torch.equal(la[1], lb[0])  # the document went on exactly as in model a
    forgot = feed(every_memory(), docs[1:, half:], first=True)  # without the saved memories
    assert not torch.equal(forgot[0][0], rest_a[0][1])


def test_whole_memory_round_trip(tmp_path):
    a = every_memory()
    feed(a, torch.randint(0, 64, (3, 5 * L)), first=True)  # 80 tokens: the ring of 64 wrapped
    save_memory(a, tmp_path / "all.mem")
    b = every_memory()
    load_memory(b, tmp_path / "all.mem")
    assert b.n_streams == 3
    nxt = torch.randint(0, 64, (3, L))
    assert torch.equal(feed(a, nxt, first=False)[0], feed(b, nxt, first=False)[0])


def test_refusals_are_one_line(tmp_path):
    a = every_memory()
    feed(a, torch.randint(0, 64, (2, 2 * L)), first=True)
    save_memory(a, tmp_path / "all.mem")
    save_memory(a, tmp_path / "one.mem", stream=0)
    b = every_memory()
    b.allocate_state(2)
    cases = [
        (lambda: save_memory(a, tmp_path / "x", stream=2), "stream 2 does not exist"),
        (lambda: load_memory(b, tmp_path / "all.mem", stream=0), "holds 2 streams"),
        (lambda: load_memory(b, tmp_path / "one.mem", stream=2), "streams [2] do not exist"),
        (lambda: load_memory(every_memory(capacity=32), tmp_path / "one.mem", stream=0),
         "kNN capacity 64"),
        (lambda: load_memory(every_memory(seed=1), tmp_path / "one.mem", stream=0),
         "made by other weights"),
        (lambda: load_memory(MemformerLM(ModelConfig(vocab_size=64, n_layers=1, d_model=32,
                                                     n_heads=4, head_dim=8, xl_cache=True)),
                             tmp_path / "one.mem"), "holds the state of XLCache"),
    ]
    for call, message in cases:
        with pytest.raises(MemformersError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value)
