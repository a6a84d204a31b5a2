"""Infini-attention: a compressive linear-attention memory per head (docs/infini.md).

Munkhdalai, Faruqui, Gopal (2024), "Leave No Context Behind", eqs. (3)-(6).
Per (stream, head) the layer keeps a matrix M (d_k x d_v) and a normaliser
z (d_k). With sigma = ELU + 1 and the segment's Q, K, V (the same projections
as local attention, but WITHOUT position encoding), each segment s does

    retrieve (from the PREVIOUS state):
        A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})                       (3)
    then update, "linear":
        M_s = M_{s-1} + sigma(K)^T V                                        (4)
    or "delta" (Linear + Delta):
        M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1}))  (5)
    and in both cases
        z_s = z_{s-1} + sum_t sigma(K_t)
    gate with one learned scalar per head:
        A = sigmoid(beta_h) * A_mem + (1 - sigmoid(beta_h)) * A_dot         (6)

A variant (``feature = "learned"``, not in the paper) replaces sigma(x) in (3)-(5) by a
learned map into ``feature_dim`` (F) dimensions, per layer, shared by its heads:

    phi(x) = sigma(x A + gelu(x W1) W2),   A (d_k, F), W1 (d_k, 2 d_k), W2 (2 d_k, F)

with A = [I | random] and W2 = 0 at init, so the first d_k features start as the paper's
sigma(x). M is then F x d_v and z has F entries: a wider feature space holds more nearly
orthogonal keys (docs/infini.md: a trained head's read-back at d 128 rose from 10% to 90%
at 256 tokens with such a map).

Details of this implementation:

* The denominators are clamped at ``eps``. sigma > 0 and z >= 0, so the
  denominator is exactly 0 only for an empty memory (a fresh document); then
  the retrieval is 0 and the delta rule's correction is 0 (it degrades to the
  linear rule). Like the paper, an empty memory still takes its gate share:
  on a fresh stream the output is (1 - sigmoid(beta)) * A_dot, not A_dot.
* Only tokens with ``mask`` True are written (padding never enters M or z).
* M and z are kept and accumulated in float32, also under bf16 autocast.
* The state is NOT detached when written, so the loss of a later segment
  back-propagates into earlier segments (BPTT, as the paper trains);
  ``detach()`` truncates that graph, ``reset()`` builds new tensors (no
  in-place ops) so it is safe in the middle of a graph.
* The gate parameter is called ``gate`` (``...memory.gate`` in the model);
  ``InfiniMemory.param_groups`` gives them their own optimizer group
  (``cfg.gate_lr``, no weight decay): the public reproduction attempts found
  the gates stuck near 0.5 under the global lr and weight decay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memformers.errors import MemformersError
from memformers.memory.base import AttentionMemory
from memformers.memory.configs import InfiniConfig


def sigma(x: torch.Tensor) -> torch.Tensor:
    """The paper's nonlinearity for keys and queries: ELU + 1 (> 0 everywhere)."""
    return F.elu(x) + 1.0


def read_memory(s: torch.Tensor, M: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """sigma-features s (B, H, L, d_k) read from M (B, H, d_k, d_v) normalised by z (B, H, d_k):
    s M / (s z), the retrieval of eq. (3) (s = sigma(Q)) and of the delta rule's eq. (5)
    (s = sigma(K)); the denominator clamped at ``eps``. Returns (B, H, L, d_v)."""
    return (s @ M) / (s @ z.unsqueeze(-1)).clamp_min(eps)


class InfiniMemory(AttentionMemory):
    """Per-head compressive memory gated with local attention (Infini-attention)."""
    state_kind = "infini"

    carried = ("M", "z")  # updated out of place: references are snapshots

    def __init__(self, cfg: InfiniConfig, *, n_heads: int, head_dim: int, d_model: int):
        super().__init__()
        if cfg.update not in ("linear", "delta"):
            raise MemformersError(
                f"model.infini.update must be 'linear' or 'delta', got '{cfg.update}'")
        if cfg.feature not in ("elu", "learned"):
            raise MemformersError(
                f"model.infini.feature must be 'elu' or 'learned', got '{cfg.feature}'")
        self.cfg = cfg
        self.n_heads, self.head_dim = n_heads, head_dim
        self.gate = nn.Parameter(torch.full((n_heads,), float(cfg.gate_init)))  # beta_h
        F_ = cfg.feature_dim or head_dim  # feature space (d_k for the paper's sigma)
        if cfg.feature == "elu" and F_ != head_dim:
            raise MemformersError("model.infini.feature_dim needs feature = 'learned' (the "
                                  "paper's ELU + 1 keeps the head's dimension)")
        if F_ < head_dim:
            raise MemformersError(f"model.infini.feature_dim must be >= head_dim "
                                  f"({head_dim}), got {F_}")
        self.feature_dim = F_
        if cfg.feature == "learned":
            A = torch.zeros(head_dim, F_)
            A[:, :head_dim] = torch.eye(head_dim)  # the first d_k features start as sigma(x)
            A[:, head_dim:] = torch.randn(head_dim, F_ - head_dim) * head_dim ** -0.5
            self.feature_proj = nn.Parameter(A)  # A
            self.feature_mlp = nn.Sequential(nn.Linear(head_dim, 2 * head_dim), nn.GELU(),
                                             nn.Linear(2 * head_dim, F_))  # W1, W2
            nn.init.zeros_(self.feature_mlp[2].weight)
            nn.init.zeros_(self.feature_mlp[2].bias)
        self.M: torch.Tensor | None = None  # (B, H, d_k, d_v) float32
        self.z: torch.Tensor | None = None  # (B, H, d_k) float32
        self.batch_size = 0
        self.device: torch.device | str = "cpu"

    # ----------------------------------------------------------------- state

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        """Features of queries / keys (..., d_k) -> (..., F): sigma(x), or the learned map."""
        if self.cfg.feature == "elu":
            return sigma(x)
        w1, w2 = self.feature_mlp[0], self.feature_mlp[2]
        dt = x.dtype  # the memory's float32 math, whatever dtype the parameters are kept in
        h = F.gelu(F.linear(x, w1.weight.to(dt), w1.bias.to(dt)))
        return sigma(x @ self.feature_proj.to(dt) + F.linear(h, w2.weight.to(dt), w2.bias.to(dt)))

    def allocate(self, batch_size: int, device: torch.device | str) -> None:
        self.batch_size, self.device = batch_size, device
        H, F_, d = self.n_heads, self.feature_dim, self.head_dim
        self.M = torch.zeros(batch_size, H, F_, d, device=device, dtype=torch.float32)
        self.z = torch.zeros(batch_size, H, F_, device=device, dtype=torch.float32)

    def reset(self, streams: torch.Tensor) -> None:
        if self.M is None:
            return
        flag = streams.to(self.M.device, torch.bool)
        # torch.where makes new tensors: the graph of the other streams survives.
        self.M = torch.where(flag[:, None, None, None], 0.0, self.M)
        self.z = torch.where(flag[:, None, None], 0.0, self.z)

    def detach(self) -> None:
        if self.M is not None:
            self.M, self.z = self.M.detach(), self.z.detach()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.M is None:
            return {}
        return {"M": self.M.detach().contiguous(), "z": self.z.detach().contiguous()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            self.M = self.z = None
            return
        if set(tensors) != {"M", "z"}:
            raise MemformersError(
                f"Infini-attention state needs tensors 'M' and 'z', got {sorted(tensors)}")
        M, z = tensors["M"], tensors["z"]
        H, F_, d = self.n_heads, self.feature_dim, self.head_dim
        if M.dim() != 4 or M.shape[1:] != (H, F_, d) or z.shape != M.shape[:3]:
            raise MemformersError(
                f"Infini-attention state has shape M{tuple(M.shape)} z{tuple(z.shape)}, "
                f"expected M(B, {H}, {F_}, {d}) z(B, {H}, {F_})")
        self.M = M.to(self.device, torch.float32).clone()
        self.z = z.to(self.device, torch.float32).clone()
        self.batch_size = M.shape[0]

    def state_bytes_per_stream(self) -> int:
        return self.n_heads * self.feature_dim * (self.head_dim + 1) * 4  # float32 M and z

    def describe_state(self, segment_len: int, itemsize: int = 4) -> str:
        """Constant, whatever the context length: M and z of every head (docs/infini.md)."""
        return f"{self.n_heads} heads x {self.feature_dim} x ({self.head_dim} + 1) x 4 B"

    # ----------------------------------------------------------------- forward

    def gate_values(self) -> torch.Tensor:
        return torch.sigmoid(self.gate.detach())  # (H,)

    def param_groups(self, train_cfg) -> list[dict]:
        """The gate fix of the failed public reproduction: its own higher lr, no decay."""
        return [{"params": [self.gate], "lr": self.cfg.gate_lr, "weight_decay": 0.0,
                 "name": "infini_gate"}]

    def _state(self, B: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.M is None:
            self.allocate(B, device)
        if self.M.shape[0] != B:
            raise MemformersError(
                f"Infini-attention memory holds {self.M.shape[0]} streams but the batch has "
                f"{B}; call allocate() when the batch size changes")
        return self.M, self.z

    def forward(
        self,
        q: torch.Tensor,  # (B, H, L, d_k) no position encoding
        k: torch.Tensor,  # (B, H, L, d_k) no position encoding
        v: torch.Tensor,  # (B, H, L, d_v)
        local_out: torch.Tensor,  # (B, H, L, d_v) A_dot
        mask: torch.Tensor,  # (B, L) bool, real tokens
        commit: bool,
    ) -> torch.Tensor:  # (B, H, L, d_v)
        B = q.shape[0]
        eps = self.cfg.eps
        M, z = self._state(B, q.device)
        with torch.autocast(device_type=q.device.type, enabled=False):
            sq, sk, vf = self.phi(q.float()), self.phi(k.float()), v.float()

            # (3) retrieval from the state of the previous segments only
            a_mem = read_memory(sq, M, z, eps)  # (B, H, L, d_v)

            if commit:
                sk = sk * mask[:, None, :, None].to(sk.dtype)  # padding writes nothing
                if self.cfg.update == "delta":  # (5) write only what M does not yet hold
                    old = read_memory(sk, M, z, eps)  # (B, H, L, d_v)
                    vf = vf - old
                self.M = M + sk.transpose(-2, -1) @ vf  # (B, H, d_k, d_v)
                self.z = z + sk.sum(dim=2)  # (B, H, d_k)

        g = torch.sigmoid(self.gate).view(1, -1, 1, 1).to(local_out.dtype)  # (1, H, 1, 1)
        return g * a_mem.to(local_out.dtype) + (1.0 - g) * local_out  # (6)
