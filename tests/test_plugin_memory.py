"""A new mechanism is one file plus one registry line.

The toy memory below is defined here, registered with one call, configured under
[model.memories.toy], and then trains, checkpoints, resumes exactly and saves / loads its
memory through the library's own trainer and persistence -- no other file knows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from memformers.config import load_config
from memformers.memory import ATTENTION_MEMORIES, AttentionMemory, register_attention_memory
from memformers.memory.persist import load_memory, save_memory
from memformers.memory.state import collect_state_tensors
from memformers.train.checkpoint import latest_checkpoint, read_checkpoint
from memformers.train.trainer import Trainer
from tests.conftest import TINY_MODEL


@dataclass
class ToyConfig:
    layers: list[int] = field(default_factory=list)
    decay: float = 0.5


class ToyMemory(AttentionMemory):
    """An exponential moving average of each head's past values, added through a gate:

        m_s = decay * m_{s-1} + (1 - decay) * mean_t v_t,   out = local + sigmoid(g) * m_{s-1}
    """

    config_class = ToyConfig
    state_kind = "toy"
    carried = ("avg",)

    def __init__(self, cfg: ToyConfig, n_heads: int, head_dim: int, d_model: int):
        super().__init__()
        self.cfg, self.n_heads, self.head_dim = cfg, n_heads, head_dim
        self.gate = nn.Parameter(torch.zeros(n_heads))
        self.avg: torch.Tensor | None = None  # (B, H, d)

    def allocate(self, batch_size, device):
        self.avg = torch.zeros(batch_size, self.n_heads, self.head_dim, device=device)

    def reset(self, streams):
        self.avg = torch.where(streams.to(self.avg.device)[:, None, None], 0.0, self.avg)

    def detach(self):
        self.avg = self.avg.detach()

    def state_tensors(self):
        return {"avg": self.avg}

    def load_state_tensors(self, tensors):
        self.avg = tensors["avg"].to(self.gate.device).clone()

    def state_bytes_per_stream(self):
        return self.n_heads * self.head_dim * 4

    def forward(self, q, k, v, local_out, mask, commit):
        out = local_out + torch.sigmoid(self.gate)[:, None, None] * self.avg[:, :, None]
        if commit:
            w = mask[:, None, :, None].to(v.dtype)  # (B, 1, L, 1)
            mean = (v * w).sum(2) / w.sum(2).clamp(min=1)  # (B, H, d)
            self.avg = self.cfg.decay * self.avg + (1 - self.cfg.decay) * mean
        return out


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(ATTENTION_MEMORIES, "toy", ATTENTION_MEMORIES.get("toy"))
    register_attention_memory("toy", ToyMemory)


def config(corpus, *sets):
    return load_config(None, [*TINY_MODEL, f"data.corpus=\"{corpus}\"", "train.steps=4",
                              "train.ckpt_every=2", "model.memories.toy.layers=[1]",
                              "model.memories.toy.decay=0.75", *sets])


def test_toy_memory_trains_checkpoints_resumes_and_persists(toy, tiny_corpus, tmp_path):
    cfg = config(tiny_corpus)
    full = Trainer(cfg, tmp_path / "full", progress=False)
    assert "toy" in full.describe() and "toy 128 B" in full.describe()
    memory = full.model.blocks[1].attn.memory
    assert isinstance(memory, ToyMemory) and memory.cfg.decay == 0.75
    full.run()
    assert memory.gate.grad is None and not torch.equal(memory.gate, torch.zeros(4))  # trained

    part = Trainer(config(tiny_corpus, "train.steps=2"), tmp_path / "part", progress=False)
    part.run()
    part.close()
    meta, _ = read_checkpoint(latest_checkpoint(tmp_path / "part"))
    assert meta["state_bytes_per_stream"] > 0
    resumed = Trainer(config(tiny_corpus), tmp_path / "part", resume=True, progress=False)
    assert resumed.step == 2
    resumed.run()
    for (name, a), b in zip(full.model.state_dict().items(),
                            resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name  # resumed exactly, memory included
    state = collect_state_tensors(full.model)
    assert torch.allclose(state["blocks.1.attn.memory.avg"],
                          collect_state_tensors(resumed.model)["blocks.1.attn.memory.avg"])

    save_memory(full.model, tmp_path / "toy.mem")
    fresh = Trainer(config(tiny_corpus), tmp_path / "fresh", progress=False).model
    load_memory(fresh, tmp_path / "toy.mem", strict=False)
    assert torch.equal(collect_state_tensors(fresh)["blocks.1.attn.memory.avg"],
                       state["blocks.1.attn.memory.avg"])


def test_toy_memory_matches_its_recurrence(toy, tiny_corpus, tmp_path):
    """The registry places the toy in the configured layer and the model's forward runs its
    recurrence exactly: m_s from the layer's own values, by hand."""
    model = Trainer(config(tiny_corpus), tmp_path / "r", progress=False).model.eval()
    memory = model.blocks[1].attn.memory
    seen = []
    memory.register_forward_hook(lambda m, args, out: seen.append(args[2].detach()))
    tokens = torch.randint(0, 256, (2, 64))
    model.allocate_state(2)
    with torch.no_grad():
        for s in range(2):
            model(tokens[:, 32 * s:32 * (s + 1)], new_doc=torch.tensor([s == 0] * 2))
    want = torch.zeros_like(memory.avg)
    for v in seen:
        want = 0.75 * want + 0.25 * v.mean(2)
    assert torch.allclose(memory.avg, want, atol=1e-6)


def test_unregistered_memory_table_is_one_clear_error(tiny_corpus):
    from memformers.errors import MemformersError

    with pytest.raises(MemformersError, match="no attention memory is registered as 'nope'"):
        load_config(None, ["model.memories.nope.layers=[1]"])
