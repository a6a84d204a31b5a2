"""Feed-forward blocks. ``build_ffn`` is the one place a layer's FFN is chosen,
so a product-key memory can replace it (``model.pkm.layers``).

Every FFN is called as ``ffn(x, mask)`` with x (B, L, D) and the (B, L) bool mask of
real tokens: the product-key memory's query BatchNorm takes its statistics from the
real tokens only; the dense MLP works token by token and ignores the mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """GELU MLP, or SwiGLU: W2 (silu(W1 x) * W3 x) (Shazeer 2020)."""

    def __init__(self, d_model: int, d_ff: int, kind: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(d_model, d_ff * (2 if kind == "swiglu" else 1), bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D); ``mask`` is the FFN interface's, unused here."""
        h = self.up(x)
        if self.kind == "swiglu":
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        else:
            h = F.gelu(h)
        return self.drop(self.down(h))
