"""Memorizing Transformers kNN memory (Wu et al., ICLR 2022; docs/knn.md).

The kNN layer keeps, per (stream, head), a FIFO memory of the (key, value)
pairs of earlier segments and lets every query attend to its top-k nearest
stored keys as well as to the local (XL) context:

    q = s_h * q / |q|,  k = k / |k|          L2-normalised, learned scale s_h > 0
                                             (``normalize = false``: q / sqrt(d), k as
                                             they are, the layer's own scaling)
    V_c = softmax(q K_local^T) V_local        local attention (SDPA, scale 1)
    (K_m, V_m_) = top-k of q . k_mem          retrieved, stop-gradient
    V_m = softmax(q K_m^T) V_m_               separate softmax over the k scores
    V   = g_h V_m + (1 - g_h) V_c,  g_h = sigmoid(b_h)

With ``combine = "joint"`` the retrieved pairs join the local softmax instead, as
keys lying beyond the window (the farthest relative-position bucket, bias beta_h):

    s_m = q . k_m + beta_h + b_h                        for each of the top-k
    V   = (sum_local e^{s} v + sum_top-k e^{s_m} v_m) / (Z_local + Z_m)
        = w V_m + (1 - w) V_c,   w = sigmoid(log Z_m - log Z_local)

and the memory only stores what has left the local window (the segment the XL cache
drops), so no key is counted twice. A memory-free model that was pretrained with
this layer's normalised q/k then reads the retrieved pairs as it reads far context,
with no training (docs/knn.md, "joint").

Retrieval happens BEFORE this segment's keys/values are written (a segment
never retrieves itself). Memories carry no position information. Gradients
reach q (and s_h) through the scores and b_h through the gate; the stored and
retrieved keys/values are constants. A stream whose memory is still empty gets
V = V_c exactly, so ``capacity = 0`` is the plain (XL) model with normalised q/k.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from memformers.errors import MemformersError
from memformers.memory.base import AttentionMemory
from memformers.memory.configs import KNNConfig
from memformers.memory.knn_store import KNNStore, knn_footprint_bytes
from memformers.memory.knn_usage import KNNRetrievalStats
from memformers.memory.state import remember, replaying


class KNNMemoryAttention(AttentionMemory):
    state_kind = "knn"
    may_skip_parameters = True  # the gate is unused while every memory is empty

    def __init__(self, cfg: KNNConfig, *, n_heads: int, head_dim: int, d_model: int):
        super().__init__()
        if cfg.scale_init <= 0:
            raise MemformersError(f"model.knn.scale_init must be positive, got {cfg.scale_init}")
        self.cfg = cfg
        self.n_heads, self.head_dim = n_heads, head_dim
        if cfg.normalize:
            self.log_scale = nn.Parameter(torch.full((n_heads,), math.log(cfg.scale_init)))
        self.gate = nn.Parameter(torch.full((n_heads,), float(cfg.gate_init)))  # b_h
        self.store = KNNStore(cfg, n_heads, head_dim)  # plain attribute: not in state_dict
        self.retrieval = KNNRetrievalStats(n_heads)  # evaluation statistics (track_usage)
        if cfg.combine == "joint":  # instance attribute: the inputs depend on the mode
            self.extra_inputs = ("local_lse", "far_bias", "leaving")

    @staticmethod
    def layer_config(cfg: KNNConfig, layer: int) -> KNNConfig:
        """``normalize`` given as a list of layers -> true or false for this layer."""
        if isinstance(cfg.normalize, bool):
            return cfg
        return dataclasses.replace(cfg, normalize=layer in cfg.normalize)

    # ----------------------------------------------------------------- attention

    def transform_qk(self, q, k):
        """L2-normalise q, k per head; q times the learned temperature; SDPA scale 1.
        Without ``normalize``: q / sqrt(d), so that every score (local and memory) is the
        layer's own q.k / sqrt(d)."""
        if not self.cfg.normalize:
            return q * q.shape[-1] ** -0.5, k, 1.0
        scale = self.log_scale.exp().to(q.dtype)[None, :, None, None]  # (1, H, 1, 1)
        q = nn.functional.normalize(q, dim=-1) * scale
        k = nn.functional.normalize(k, dim=-1)
        return q, k, 1.0

    def forward(self, q, k, v, local_out, mask, commit, local_lse=None, far_bias=None,
                leaving=None):
        # The store is written in place: a checkpointed segment recomputed in backward
        # reads what its first run retrieved and writes nothing (memory/state.py).
        hit = remember(self, lambda: None if self.store.is_empty() else self._retrieve(q))
        out = local_out
        if hit is not None and self.retrieval.enabled and not replaying():
            B, H, L, _ = q.shape
            self.retrieval.record(hit[2].view(B, H, L, -1), self.store.count,
                                  self.store.capacity)
        if hit is not None and self.cfg.combine == "joint":
            out = self._read_joint(q, local_out, local_lse, far_bias, *hit)
        elif hit is not None:
            out = self._read(q, local_out, *hit)
        elif self.touch_skipped_parameters:  # FSDP2: a zero gradient for the unused gate
            out = local_out + 0.0 * self.gate.sum().to(local_out.dtype)
        if commit and not replaying():
            if self.cfg.combine == "gate":
                self.store.write(k, v, mask)
            elif leaving is not None:  # joint: only what has left the local window
                self.store.write(*leaving)
        return out

    def _retrieve(self, q: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The top-k stored (keys, values) (S, L, k, d) fp32 and ring slots (S, L, k), -1
        where a memory holds fewer than k rows; constants (no gradient)."""
        B, H, L, d = q.shape
        k_top = min(self.cfg.top_k, self.cfg.capacity)
        _, slots = self.store.search(q.detach().float().reshape(B * H, L, d), k_top)
        k_mem, v_mem = self.store.gather(slots)
        return k_mem, v_mem, slots

    def _read(self, q: torch.Tensor, local_out: torch.Tensor, k_mem: torch.Tensor,
              v_mem: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        B, H, L, d = q.shape
        qf = q.float().reshape(B * H, L, d)  # (S, L, d)
        scores = torch.einsum("sld,slkd->slk", qf, k_mem)  # grad -> q only
        scores = scores.masked_fill(slots < 0, float("-inf"))
        found = (slots >= 0).any(-1, keepdim=True)  # (S, L, 1) at least one memory
        weights = torch.softmax(scores.masked_fill(~found, 0.0), dim=-1)
        mem = torch.einsum("slk,slkd->sld", weights, v_mem)  # (S, L, d)
        mem = mem.view(B, H, L, d).to(local_out.dtype)
        g = torch.sigmoid(self.gate).to(local_out.dtype)[None, :, None, None]  # (1, H, 1, 1)
        mixed = g * mem + (1 - g) * local_out
        use = found.view(B, H, L, 1)  # empty memory -> pure local attention
        return torch.where(use, mixed, local_out)

    def _read_joint(self, q, local_out, local_lse, far_bias, k_mem, v_mem, slots):
        """One softmax over local keys and the top-k (module docstring, "joint")."""
        B, H, L, d = q.shape
        bias = self.gate if far_bias is None else far_bias + self.gate  # (H,)
        qf = q.float().reshape(B * H, L, d)  # (S, L, d)
        scores = torch.einsum("sld,slkd->slk", qf, k_mem)
        scores = scores + bias.float().repeat(B)[:, None, None]
        scores = scores.masked_fill(slots < 0, float("-inf"))
        lse_mem = torch.logsumexp(scores, dim=-1)  # (S, L), -inf where nothing was found
        found = torch.isfinite(lse_mem)
        weights = torch.softmax(scores.masked_fill(~found[..., None], 0.0), dim=-1)
        mem = torch.einsum("slk,slkd->sld", weights, v_mem).view(B, H, L, d)
        w = torch.sigmoid(lse_mem - local_lse.reshape(B * H, L).float())  # Z_m / (Z_l + Z_m)
        w = w.masked_fill(~found, 0.0).view(B, H, L, 1)
        return (w * mem + (1 - w) * local_out.float()).to(local_out.dtype)

    def param_groups(self, train_cfg) -> list[dict]:
        """Gates and temperatures: scalars per head, their own higher lr, no decay
        (a gate under the global lr barely moves; see docs/infini.md)."""
        scalars = [self.gate, self.log_scale] if self.cfg.normalize else [self.gate]
        return [{"params": scalars, "lr": self.cfg.gate_lr,
                 "weight_decay": 0.0, "name": "knn_gate"}]

    @property
    def holds_memory(self) -> bool:
        return self.cfg.capacity > 0

    def gate_values(self) -> torch.Tensor:
        """sigmoid(b_h): the gate ("gate"); for "joint", where b_h is the memory's
        log-weight in the softmax, a monotone view of it (0.5 = b_h 0)."""
        return torch.sigmoid(self.gate.detach())

    def scale_values(self) -> torch.Tensor | None:
        return self.log_scale.detach().exp() if self.cfg.normalize else None

    # ----------------------------------------------------------------- stream state

    def allocate(self, batch_size: int, device: torch.device | str) -> None:
        self.store.allocate(batch_size, device)

    def reset(self, streams: torch.Tensor) -> None:
        if not replaying():  # the recomputation of a segment leaves the store alone
            self.store.reset(streams)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.store.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], copy: bool = True) -> None:
        if not tensors:
            self.store.allocate(self.store.batch_size, self.store.device)
            return
        self.store.load_state_tensors(tensors, copy=copy)

    def adopt_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """A full ring of the storage dtype becomes the store's buffer, uncopied."""
        self.load_state_tensors(tensors, copy=False)

    def set_storage(self, capacity: int, storage_dtype: str | None = None) -> None:
        """Empty memories of ``capacity`` rows per (stream, head) (and ``storage_dtype``),
        e.g. those of a saved memory."""
        if capacity < 0:
            raise MemformersError(f"knn capacity must be >= 0, got {capacity}")
        batch, device = self.store.batch_size, self.store.device
        self.cfg = dataclasses.replace(self.cfg, capacity=capacity,
                                       storage_dtype=storage_dtype or self.cfg.storage_dtype)
        self.store = KNNStore(self.cfg, self.n_heads, self.head_dim)
        self.store.allocate(batch, device)

    def state_bytes_per_stream(self) -> int:
        return knn_footprint_bytes(self.cfg, self.n_heads, self.head_dim, 1, 1)

    def storage_settings(self) -> dict:
        return {"capacity": self.cfg.capacity, "storage_dtype": self.cfg.storage_dtype}

    def adopt_storage_settings(self, settings: dict) -> None:
        self.set_storage(settings["capacity"], settings["storage_dtype"])

    def describe_settings(self, settings: dict) -> str:
        return f"kNN capacity {settings['capacity']} ({settings['storage_dtype']})"

    def tokens_written(self) -> list[int]:
        return self.store.count.tolist()
