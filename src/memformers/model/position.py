"""Position information for local attention: T5 relative bias or RoPE.

Memories never see positions; only the local (and XL-cache) path does.
Query ``i`` of a segment sits at absolute position ``offset + i`` where
``offset`` is the XL cache length, so relative distances stay correct across
the segment boundary.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RelativePositionBias(nn.Module):
    """T5 bucketed relative position bias (causal), shared by all layers.

    bias[h, i, j] = emb[bucket(pos_q[i] - pos_k[j]), h]; exact buckets for short
    distances, log-spaced up to ``max_distance`` (Raffel et al. 2020, sec. 2.1).
    """

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128,
                 lr_scale: float = 10.0, init_slope: float = 0.25):
        super().__init__()
        self.lr_scale = lr_scale
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.emb = nn.Embedding(num_buckets, n_heads)
        # Locality prior: bias = -init_slope * bucket, so attention starts near the
        # query (T5 starts at 0). Measured: with zero init an XL cache trails the
        # no-cache model at equal steps; with this prior it leads (BENCHMARKS.md).
        with torch.no_grad():
            prior = -init_slope * torch.arange(num_buckets, dtype=torch.float32)
            self.emb.weight.copy_(prior[:, None].expand(num_buckets, n_heads))

    def param_groups(self, train_cfg) -> list[dict]:
        """The bias table is shared by every layer and starts at zero; under the
        global lr it grows too slowly to focus attention on nearby tokens once the
        window spans an XL cache (measured: XL worse than no cache), so it gets
        ``lr_scale`` x the lr and no weight decay."""
        return [{"params": [self.emb.weight], "lr": train_cfg.lr * self.lr_scale,
                 "weight_decay": 0.0, "name": "rel_bias"}]

    def bucket(self, distance: torch.Tensor) -> torch.Tensor:
        """distance = q_pos - k_pos (>= 0 for visible keys) -> bucket ids."""
        n = distance.clamp(min=0)
        max_exact = self.num_buckets // 2
        is_small = n < max_exact
        large = max_exact + (
            torch.log(n.float().clamp(min=1) / max_exact)
            / math.log(self.max_distance / max_exact)
            * (self.num_buckets - max_exact)
        ).long()
        large = large.clamp(max=self.num_buckets - 1)
        return torch.where(is_small, n, large)

    def farthest(self) -> torch.Tensor:
        """(H,) the bias of the last bucket: every distance >= max_distance."""
        return self.emb.weight[-1]

    def forward(self, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
        """(H, q_len, k_len) bias; queries are the LAST q_len of k_len positions."""
        q_pos = torch.arange(k_len - q_len, k_len, device=device)
        k_pos = torch.arange(k_len, device=device)
        buckets = self.bucket(q_pos[:, None] - k_pos[None, :])  # (Lq, Lk)
        return self.emb(buckets).permute(2, 0, 1)  # (H, Lq, Lk)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021) on the last dim of q/k."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x (B, H, T, d) as if it sat at positions start..start+T-1."""
        t = torch.arange(start, start + x.shape[-2], device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)  # (T, d/2)
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2)
