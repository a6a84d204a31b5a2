"""Can a trained Infini-attention head keep one binding among N stored tokens?

A module-level experiment (issue 21, step 1): no language model, only one compressive
memory head trained end to end on synthetic needle-in-filler streams. A stream holds N
tokens (the memory's content) with one key symbol K followed by its value symbol V at a
random place among filler symbols, then a last segment of filler ending with K again;
the head must output V there. The memory is the module's own (memory/infini.py):

    read     A = sigma(q) M_{s-1} / (sigma(q) z_{s-1})                            (3)
    linear   M_s = M_{s-1} + sum_t g_t sigma(k_t)^T v_t                           (4)
    delta    M_s = M_{s-1} + sum_t g_t sigma(k_t)^T (v_t - A(k_t)),
             A(k_t) = sigma(k_t) M_{s-1} / (sigma(k_t) z_{s-1})                   (5)
             z_s = z_{s-1} + sum_t g_t sigma(k_t)

with sigma = ELU + 1 and g_t = 1 in the paper. The options tested:

* ``feature="learned"``: a learned two-layer map before sigma (phi(x) = sigma(W2 gelu(W1 x))),
  so the head may learn features that are near 0 for the filler;
* ``write_gate=True``: a learned per-token write gate g_t = sigmoid(w . x_t + b);
* ``normalise=False``: A = sigma(q) M_{s-1}, without the positive-feature normaliser (to
  see whether the normaliser is what limits the read).

Token t's input is x_t = E[token_t] + E_prev[token_{t-1}], so the value token V can be
written under a key made from K (as an attention layer below would provide). Gradients
flow through every write (BPTT over the whole stream). ``run_capacity`` trains one
configuration and returns the read-back accuracy on fresh streams (chance: 1 /
``n_values``); ``scripts/infini_capacity.py`` sweeps N, d and the options.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memformers.memory.infini import read_memory, sigma


@dataclass
class CapacityConfig:
    n: int = 256  # tokens stored before the query segment (a multiple of segment)
    d: int = 32  # the head's key/value width
    update: str = "linear"  # "linear" (eq. 4) | "delta" (eq. 5)
    feature: str = "elu"  # "elu": sigma(k) | "learned": sigma(W2 gelu(W1 k))
    write_gate: bool = False
    normalise: bool = True
    segment: int = 64
    n_keys: int = 16
    n_values: int = 16
    n_filler: int = 64
    d_model: int = 64
    steps: int = 200
    batch: int = 32
    lr: float = 3e-3
    eval_streams: int = 512
    seed: int = 0
    eps: float = 1e-6


def make_streams(cfg: CapacityConfig, batch: int, gen: torch.Generator):
    """(tokens (B, N + segment), needle values (B,)): symbols 0..K-1 keys, K..K+V-1 values,
    then filler; the needle pair at a random place in the first N tokens, the query key
    last."""
    K, V, Fn = cfg.n_keys, cfg.n_values, cfg.n_filler
    T = cfg.n + cfg.segment
    tokens = K + V + torch.randint(0, Fn, (batch, T), generator=gen)
    key = torch.randint(0, K, (batch,), generator=gen)
    value = torch.randint(0, V, (batch,), generator=gen)
    pos = torch.randint(0, cfg.n - 1, (batch,), generator=gen)
    rows = torch.arange(batch)
    tokens[rows, pos] = key
    tokens[rows, pos + 1] = K + value
    tokens[:, -1] = key
    return tokens, value


class CapacityHead(nn.Module):
    """Embeddings, W_q / W_k / W_v, the options above, and a readout to the value symbols."""

    def __init__(self, cfg: CapacityConfig):
        super().__init__()
        self.cfg = cfg
        vocab = cfg.n_keys + cfg.n_values + cfg.n_filler
        self.embed = nn.Embedding(vocab, cfg.d_model)
        self.embed_prev = nn.Embedding(vocab + 1, cfg.d_model)  # + "no previous token"
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d, bias=False)
        if cfg.feature == "learned":
            self.feature = nn.Sequential(nn.Linear(cfg.d, 2 * cfg.d), nn.GELU(),
                                         nn.Linear(2 * cfg.d, cfg.d))
        self.gate = nn.Linear(cfg.d_model, 1) if cfg.write_gate else None
        self.readout = nn.Linear(cfg.d, cfg.n_values)

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        return sigma(self.feature(x) if self.cfg.feature == "learned" else x)

    def features(self, tokens: torch.Tensor):
        """(sigma(q), sigma(k), v, g), each (B, T, .) -- g (B, T, 1) the write weights."""
        prev = F.pad(tokens[:, :-1], (1, 0), value=self.embed_prev.num_embeddings - 1)
        x = self.embed(tokens) + self.embed_prev(prev)  # (B, T, D)
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, T, d) each
        g = torch.sigmoid(self.gate(x)) if self.gate is not None else torch.ones_like(v[..., :1])
        return self.phi(q), self.phi(k), v, g

    def read(self, sq: torch.Tensor, M: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalise:
            return read_memory(sq, M, z, self.cfg.eps)
        return sq @ M

    def update(self, M, z, sk, v, g):
        """One segment's write (eq. 4 or 5) of sk, v (B, L, d) weighted by g (B, L, 1)."""
        if self.cfg.update == "delta":
            v = v - read_memory(sk, M, z, self.cfg.eps)
        return M + (g * sk).transpose(1, 2) @ v, z + (g * sk).sum(1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_values) at the stream's last position, read from the memory of every
        earlier segment (the query segment reads, and is not written)."""
        sq, sk, v, g = self.features(tokens)
        B, T, d = v.shape
        L = self.cfg.segment
        M = v.new_zeros(B, d, d)
        z = v.new_zeros(B, d)
        for s in range(0, T - L, L):
            M, z = self.update(M, z, sk[:, s:s + L], v[:, s:s + L], g[:, s:s + L])
        return self.readout(self.read(sq[:, -1:], M, z)[:, 0])


def run_capacity(cfg: CapacityConfig) -> dict:
    """Train one configuration; {config..., accuracy, chance, final_loss}."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    head = CapacityHead(cfg)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    loss = torch.tensor(math.nan)
    for step in range(cfg.steps):
        tokens, value = make_streams(cfg, cfg.batch, gen)
        loss = F.cross_entropy(head(tokens), value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        for group in opt.param_groups:  # cosine decay
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        opt.step()
    test = torch.Generator().manual_seed(10_000 + cfg.seed)
    with torch.no_grad():
        tokens, value = make_streams(cfg, cfg.eval_streams, test)
        acc = float((head(tokens).argmax(-1) == value).float().mean())
    return {**asdict(cfg), "accuracy": acc, "chance": 1 / cfg.n_values,
            "final_loss": float(loss.detach())}
