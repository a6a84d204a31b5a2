"""Product-key memory layer (Lample et al., NeurIPS 2019; docs/pkm.md).

A drop-in FFN replacement: the block computes ``x + m(x)`` with

    q        = norm(W_q x + b)                                   (T, H, k_dim)
    q1, q2   = q[..., :k_dim/2], q[..., k_dim/2:]                 two half-queries
    s1, I1   = topk_i <q1, c1_i>      s2, I2 = topk_j <q2, c2_j>  (k of n each)
    s, slot  = topk_{a,b} s1[a] + s2[b],  slot = I1[a] * n + I2[b] (exact top-k of n^2)
    w        = softmax(s)                                         fp32, over the k per head
    m(x)     = sum_h sum_i w_hi V[slot_hi]                         one EmbeddingBag, heads summed

The k x k candidate step is exact: if slot (i, j) beats all but fewer than k
full keys, then fewer than k sub-keys of half 1 beat i (each would pair with j
into a better full key), so i is in half 1's top-k, and likewise j; with ties
another equally-scored slot may be chosen, so the top-k *scores* always match.

Options: "Memory+" output ``W2(m(x) * silu(W1 x))`` and one value table shared
by every PKM layer of a model (Berges et al., "Memory Layers at Scale", 2024);
sparse value gradients (``EmbeddingBag(sparse=True)`` + ``SparseAdam``).
Value tables get their own optimizer (Adam, constant ``value_lr``, no weight
decay): see ``ProductKeyMemory.param_groups``. Slot-usage statistics
for evaluation: ``track_pkm_usage`` + ``pkm_usage_report``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from memformers.errors import MemformersError
from memformers.memory.configs import PKMConfig
from memformers.memory.state import replaying

# --------------------------------------------------------------------------- query norm


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose batch statistics come only from real tokens.

    ``x`` (T, C), ``mask`` (T,) bool. In training the mean/variance are taken
    over rows where ``mask`` is True (padding cannot leak into real tokens) and
    the running statistics are updated from them; every row, padded or not, is
    normalised with those statistics. In eval the running statistics are used.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        # A checkpointed segment run again in backward: the statistics were updated once.
        update = not replaying()
        if x.shape[0] > 1 and (mask is None or bool(mask.all())):  # no padding: native kernel
            if update:
                return super().forward(x)
            return F.batch_norm(x, self.running_mean.clone(), self.running_var.clone(),
                                self.weight, self.bias, True, 0.0, self.eps)  # same kernel
        mean, var, count = self.masked_moments(x, mask)
        if update:
            with torch.no_grad():  # a batch without real tokens updates nothing
                unbiased = var * (count / (count - 1).clamp(min=1))
                mom = self.momentum if self.momentum is not None else 1.0 / float(
                    self.num_batches_tracked + 1)
                w = (count > 0).to(x.dtype) * mom
                # .data: the native kernel of an earlier segment in this backward window
                # saved the buffers (unused by its training-mode backward); an in-place
                # update on them would fail autograd's version check.
                self.running_mean.data.lerp_(mean, w)
                self.running_var.data.lerp_(unbiased, w)
                self.num_batches_tracked += 1
        return self.normalise(x, mean, var)

    @staticmethod
    def masked_moments(x: torch.Tensor, mask: torch.Tensor | None):
        """Mean and biased variance (C,) over the real rows of x (T, C), and their count."""
        m = (torch.ones_like(x[:, 0]) if mask is None else mask.to(x.dtype))[:, None]  # (T, 1)
        count = m.sum()
        n = count.clamp(min=1)
        mean = (x * m).sum(0) / n
        return mean, ((x - mean).square() * m).sum(0) / n, count

    def normalise(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


# --------------------------------------------------------------------------- product keys


@lru_cache(maxsize=8)
def candidate_pairs(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank pairs (a, b) with (a + 1) * (b + 1) <= k: all that can reach the top-k.

    With both halves' top-k sorted descending, pair (a, b) is beaten or tied by
    the (a + 1)(b + 1) pairs (a' <= a, b' <= b), so pairs outside this set can
    only tie the k-th score: the top-k scores are unchanged (k=32: 1024 -> 119).
    """
    a, b = zip(*[(a, b) for a in range(k) for b in range(k) if (a + 1) * (b + 1) <= k])
    return torch.tensor(a), torch.tensor(b)


class _SubkeyScores(torch.autograd.Function):
    """s[g, t, j] = <q[g, t], keys[g, idx[g, t, j]]> for the selected sub-keys.

    Forward takes the already-computed top-k values; backward never builds a
    dense (G, T, n) gradient for q: grad_q is an EmbeddingBag over the k
    selected sub-keys; grad_keys scatters the k gradients into (G, T, n) and
    does one bmm (instead of the two bmm's of autograd through the full scores).
    """

    @staticmethod
    def forward(ctx, q, keys, values, idx):  # (G, T, h), (G, n, h), (G, T, k), (G, T, k)
        ctx.save_for_backward(q, keys, idx)
        return values

    @staticmethod
    def backward(ctx, grad):  # (G, T, k)
        q, keys, idx = ctx.saved_tensors
        G, T, h = q.shape
        n, k = keys.shape[1], idx.shape[-1]
        grad_q = grad_keys = None
        if ctx.needs_input_grad[0]:
            offs = (torch.arange(G, device=idx.device) * n)[:, None, None]
            grad_q = F.embedding_bag((idx + offs).view(G * T, k), keys.reshape(G * n, h),
                                     per_sample_weights=grad.reshape(G * T, k).to(keys.dtype),
                                     mode="sum").view(G, T, h)
        if ctx.needs_input_grad[1]:
            dense = torch.zeros(G, T, n, dtype=grad.dtype, device=grad.device)
            dense.scatter_(-1, idx, grad)  # top-k indices are distinct within a row
            grad_keys = torch.bmm(dense.transpose(1, 2), q.to(grad.dtype))  # (G, n, h)
        return grad_q, grad_keys, None, None


def product_topk(
    q: torch.Tensor,  # (T, H, k_dim)
    keys: torch.Tensor,  # (H, 2, n, k_dim/2)
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the n^2 keys [c1_i; c2_j] via two sub-key top-k's.

    Returns scores (T, H, k) (differentiable w.r.t. q and keys) and slot
    indices (T, H, k) int64 with slot = i * n + j, scores sorted descending.
    """
    T, H, kd = q.shape
    n, half = keys.shape[2], keys.shape[3]
    qh = q.view(T, H, 2, half).permute(1, 2, 0, 3).reshape(H * 2, T, half)  # (2H, T, half)
    kh = keys.reshape(H * 2, n, half)
    with torch.no_grad():
        sub = torch.bmm(qh, kh.transpose(1, 2))  # (2H, T, n)
        s, i = sub.topk(k, dim=-1)  # (2H, T, k), sorted descending
    s = _SubkeyScores.apply(qh, kh, s, i)
    s, i = s.view(H, 2, T, k), i.view(H, 2, T, k)
    a, b = (t.to(q.device) for t in candidate_pairs(k))
    cand = s[:, 0, :, a] + s[:, 1, :, b]  # (H, T, P): s1[a] + s2[b] over the P useful pairs
    scores, pos = cand.topk(k, dim=-1)  # (H, T, k)
    i1 = i[:, 0].gather(-1, a[pos])  # (H, T, k)
    i2 = i[:, 1].gather(-1, b[pos])
    slots = i1 * n + i2
    return scores.permute(1, 0, 2).contiguous(), slots.permute(1, 0, 2).contiguous()


def init_subkeys(heads: int, n: int, half: int, generator: torch.Generator | None = None):
    """XLM's init: uniform(-1/sqrt(d), 1/sqrt(d)) sub-keys, (H, 2, n, half)."""
    bound = 1.0 / math.sqrt(half)
    return (torch.rand(heads, 2, n, half, generator=generator) * 2 - 1) * bound


# --------------------------------------------------------------------------- usage statistics


class PKMUsage:
    """Accumulates the softmax weight each slot receives over real tokens."""

    def __init__(self, n_slots: int):
        self.n_slots = n_slots
        self.enabled = False
        self.counts: torch.Tensor | None = None  # (n_slots,) float64, on the layer's device
        self.tokens = 0

    def reset(self) -> None:
        self.counts, self.tokens = None, 0

    @torch.no_grad()
    def add(self, slots: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None):
        """slots, weights (T, H, k); mask (T,) bool."""
        if self.counts is None or self.counts.device != slots.device:
            self.counts = torch.zeros(self.n_slots, dtype=torch.float64, device=slots.device)
        w = weights.double()
        if mask is not None:
            w = w * mask[:, None, None]
            self.tokens += int(mask.sum())  # one sync per eval batch, not per train step
        else:
            self.tokens += slots.shape[0]
        self.counts.index_add_(0, slots.reshape(-1), w.reshape(-1))


def usage_stats(counts: torch.Tensor) -> dict[str, float]:
    """Slot-usage metrics of a (N,) non-negative weight vector (paper, section 4.4).

    used: fraction of slots with non-zero weight; kl_uniform: KL(p || uniform)
    = sum p log(p N) of the normalised weights; slots_50/90/99: fewest slots
    holding that share of the total weight.
    """
    c = counts.detach().double().flatten().cpu()
    n = c.numel()
    total = c.sum()
    out: dict[str, float] = {"slots": n, "used": float((c > 0).sum()) / n}
    if total <= 0:
        return {**out, "kl_uniform": float("nan"), "slots_50": 0, "slots_90": 0, "slots_99": 0}
    p = c / total
    nz = p[p > 0]
    out["kl_uniform"] = float((nz * (nz * n).log()).sum())
    cum = p.sort(descending=True).values.cumsum(0)
    for q in (50, 90, 99):
        # fewest slots whose cumulative mass reaches q% (tolerate rounding)
        out[f"slots_{q}"] = int(torch.searchsorted(cum, torch.tensor(q / 100 - 1e-12,
                                                   dtype=torch.float64))) + 1
    return out


# --------------------------------------------------------------------------- the layer


class ProductKeyMemory(nn.Module):
    """Product-key memory, called as ``ffn(x, mask)``; returns m(x) (no residual).

    Eq. (paper, section 3): q(x) = BN(W x + b); I = exact top-k over product
    keys; w = softmax(scores); m(x) = sum_{i in I} w_i v_i, summed over heads.
    """

    def __init__(self, cfg: PKMConfig, *, d_model: int, shared_modules: dict | None = None):
        super().__init__()
        if cfg.k_dim % 2:
            raise MemformersError(f"model.pkm.k_dim must be even, got {cfg.k_dim}")
        if cfg.top_k > cfg.n_keys:
            raise MemformersError(f"model.pkm.top_k ({cfg.top_k}) must be <= n_keys "
                                  f"({cfg.n_keys})")
        self.cfg = cfg
        self.heads, self.k_dim, self.top_k = cfg.heads, cfg.k_dim, cfg.top_k
        self.n_keys = cfg.n_keys
        self.n_slots = cfg.n_keys ** 2
        self.query = nn.Linear(d_model, cfg.heads * cfg.k_dim, bias=True)
        if cfg.query_norm == "batchnorm":
            self.query_norm: nn.Module | None = MaskedBatchNorm1d(cfg.heads * cfg.k_dim)
        elif cfg.query_norm == "layernorm":  # per head
            self.query_norm = nn.LayerNorm(cfg.k_dim)
        elif cfg.query_norm == "none":
            self.query_norm = None
        else:
            raise MemformersError(f"model.pkm.query_norm must be batchnorm, layernorm or none; "
                                  f"got '{cfg.query_norm}'")
        self.keys = nn.Parameter(init_subkeys(cfg.heads, cfg.n_keys, cfg.k_dim // 2))
        self.values = self._value_table(cfg, d_model, shared_modules)
        if cfg.memory_plus:  # W2((sum_i s_i v_i) * silu(W1 x))
            self.gate = nn.Linear(d_model, d_model, bias=False)
            self.down = nn.Linear(d_model, d_model, bias=False)
        self.usage = PKMUsage(self.n_slots)

    @property
    def sparse(self) -> bool:
        """Sparse value gradients (``cfg.sparse``; "auto" unresolved = dense)."""
        return self.cfg.sparse is True

    def separately_sharded(self) -> list[nn.Module]:
        """Modules FSDP2 shards over every process on their own (``train.shard_pkm_values``,
        train/distributed.py): the value table (a shared one is the same module)."""
        return [self.values]

    def param_groups(self, train_cfg) -> list[dict]:
        """Optimiser groups (see ``train.optim``): the values get their own constant-lr
        Adam without weight decay (SparseAdam with ``sparse``); sub-keys are not decayed.
        Sparse value gradients are left out of gradient clipping by the trainer."""
        values = {"params": [self.values.weight], "lr": self.cfg.value_lr, "weight_decay": 0.0,
                  "constant_lr": True, "name": "pkm_values",
                  "optimizer": "sparse_adam" if self.sparse else "adamw"}
        return [values, {"params": [self.keys], "weight_decay": 0.0, "name": "pkm_keys"}]

    def _value_table(self, cfg: PKMConfig, d_model: int,
                     shared_modules: dict | None) -> nn.EmbeddingBag:
        """A new value table, or with ``share_values`` the one in ``shared_modules`` (the
        model's dict of modules shared across layers), put there by the first layer."""
        if cfg.share_values and shared_modules is not None and "pkm_values" in shared_modules:
            table = shared_modules["pkm_values"]
            if table.weight.shape != (self.n_slots, d_model) or table.sparse != self.sparse:
                raise MemformersError("model.pkm.share_values: layers disagree on the value table")
            return table
        table = nn.EmbeddingBag(self.n_slots, d_model, mode="sum", sparse=self.sparse)
        nn.init.normal_(table.weight, mean=0.0, std=d_model ** -0.5)
        if cfg.share_values and shared_modules is not None:
            shared_modules["pkm_values"] = table
        return table

    def extra_repr(self) -> str:
        return (f"slots={self.n_slots}, heads={self.heads}, k_dim={self.k_dim}, "
                f"top_k={self.top_k}, sparse={self.sparse}")

    def lookup(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """x (T, D), mask (T,) -> fp32 softmax weights (T, H, k), slots (T, H, k)."""
        T = x.shape[0]
        H, kd = self.heads, self.k_dim
        x = F.dropout(x, self.cfg.input_dropout, self.training)
        # exact scoring and selection in fp32, whatever the surrounding autocast
        with torch.autocast(device_type=x.device.type, enabled=False):
            q = self.query(x.float())  # (T, H*kd)
            if isinstance(self.query_norm, MaskedBatchNorm1d):
                q = self.query_norm(q, mask)
            elif self.query_norm is not None:
                q = self.query_norm(q.view(T, H, kd)).view(T, H * kd)
            q = F.dropout(q, self.cfg.query_dropout, self.training)
            scores, slots = product_topk(q.view(T, H, kd), self.keys.float(), self.top_k)
            weights = F.softmax(scores.float(), dim=-1)  # (T, H, k)
        return weights, slots

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        xf = x.reshape(B * L, D)
        m = mask.reshape(B * L) if mask is not None else None
        weights, slots = self.lookup(xf, m)
        if self.usage.enabled and not replaying():
            self.usage.add(slots, weights, m)
        H, k = self.heads, self.top_k
        table = self.values.weight
        out = self.values(slots.view(B * L, H * k),
                          per_sample_weights=weights.view(B * L, H * k).to(table.dtype))
        out = F.dropout(out, self.cfg.value_dropout, self.training)  # (T, D)
        if self.cfg.memory_plus:
            out = self.down(out * F.silu(self.gate(xf)))
        return out.view(B, L, -1).to(x.dtype)


# --------------------------------------------------------------------------- helpers


def resolve_sparse(cfg: PKMConfig, device: torch.device, train_cfg) -> PKMConfig:
    """``cfg`` with ``sparse="auto"`` resolved for training on ``device`` (see PKMConfig)."""
    if cfg.sparse != "auto":
        return cfg
    dense_only = device.type != "cpu" or train_cfg.parallel != "ddp" or train_cfg.shard_pkm_values
    return dataclasses.replace(cfg, sparse=not dense_only)


def pkm_modules(model: nn.Module) -> Iterator[tuple[str, ProductKeyMemory]]:
    for name, mod in model.named_modules():
        if isinstance(mod, ProductKeyMemory):
            yield name, mod


@contextmanager
def track_pkm_usage(model: nn.Module):
    """Accumulate slot weights of every PKM layer while inside the block.

    Counters are reset on entry and kept after exit for ``pkm_usage_report``.
    """
    mods = [m for _, m in pkm_modules(model)]
    for m in mods:
        m.usage.reset()
        m.usage.enabled = True
    try:
        yield
    finally:
        for m in mods:
            m.usage.enabled = False


def pkm_usage_report(model: nn.Module, world_size: int = 1) -> dict[str, dict[str, float]]:
    """Usage metrics per PKM layer (by module name), plus "shared" for a shared table.

    ``world_size > 1`` (every rank calls this): the counts of all ranks, all-reduced."""
    if world_size > 1:
        import torch.distributed as dist

        for _, m in pkm_modules(model):
            if m.usage.counts is not None:
                tokens = torch.tensor([m.usage.tokens], dtype=torch.float64,
                                      device=m.usage.counts.device)
                dist.all_reduce(m.usage.counts)
                dist.all_reduce(tokens)
                m.usage.tokens = int(tokens.item())
    report: dict[str, dict[str, float]] = {}
    by_table: dict[int, list[PKMUsage]] = {}
    for name, mod in pkm_modules(model):
        if mod.usage.counts is None:
            continue
        report[name] = {**usage_stats(mod.usage.counts), "tokens": mod.usage.tokens}
        by_table.setdefault(id(mod.values.weight), []).append(mod.usage)
    for usages in by_table.values():
        if len(usages) > 1:
            total = sum(u.counts.cpu() for u in usages)
            report["shared"] = {**usage_stats(total), "tokens": sum(u.tokens for u in usages)}
    return report


__all__ = [
    "MaskedBatchNorm1d", "PKMUsage", "ProductKeyMemory", "pkm_modules",
    "pkm_usage_report", "product_topk", "resolve_sparse", "track_pkm_usage", "usage_stats",
]
