"""Transformer-XL cache: each layer also attends to the previous segment.

Keys/values of the last committed segment are kept per stream, detached (no
gradient crosses the segment boundary), with a validity mask so a stream that
starts a new document -- or whose last segment ended in padding -- never sees
stale or padded entries (Dai et al. 2019; Memorizing Transformers sec. 3).
"""

from __future__ import annotations

import torch
from torch import nn

from memformers.memory.state import StreamState


class XLCache(StreamState, nn.Module):
    carried = ("keys", "values", "valid")
    state_kind = "xl_cache"

    def __init__(self, n_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.keys: torch.Tensor | None = None  # (B, H, C, d), pre-RoPE
        self.values: torch.Tensor | None = None  # (B, H, C, d)
        self.valid: torch.Tensor | None = None  # (B, C) bool
        self.batch_size = 0
        self.device: torch.device | str = "cpu"

    def allocate(self, batch_size: int, device: torch.device | str) -> None:
        self.batch_size, self.device = batch_size, device
        self.keys = self.values = self.valid = None

    def reset(self, streams: torch.Tensor) -> None:
        if self.valid is not None:
            self.valid = self.valid & ~streams.to(self.valid.device)[:, None]

    def read(self):
        """(keys, values, valid) or None when nothing was committed yet."""
        if self.keys is None:
            return None
        return self.keys, self.values, self.valid

    def write(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> None:
        """Store this segment's k, v (B, H, L, d) and token mask (B, L)."""
        self.keys, self.values, self.valid = k.detach(), v.detach(), mask.clone()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.keys is None:
            return {}
        return {"keys": self.keys, "values": self.values, "valid": self.valid}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            self.keys = self.values = self.valid = None
            return
        dev = self.device
        self.keys = tensors["keys"].to(dev)
        self.values = tensors["values"].to(dev)
        self.valid = tensors["valid"].to(dev)

    def state_bytes_per_stream(self) -> int:
        if self.keys is None:
            return 0
        return (self.keys[0].numel() + self.values[0].numel()) * self.keys.element_size() \
            + self.valid.shape[1]

    def planned_state_bytes(self, segment_len: int, itemsize: int = 4) -> int:
        """Keys and values of one segment, plus its validity flags (empty until the first
        segment is written)."""
        return 2 * self.n_heads * segment_len * self.head_dim * itemsize + segment_len

    def describe_state(self, segment_len: int, itemsize: int = 4) -> str:
        return (f"(2 x {self.n_heads} heads x {segment_len} x {self.head_dim} x {itemsize} B "
                f"+ {segment_len})")
