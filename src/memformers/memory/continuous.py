"""The infinity-former's continuous long-term memory (Martins et al., ACL 2022).

Per stream, the long-term memory (LTM) is a continuous signal X(t) = B^T psi(t),
t in [0, 1], over N Gaussian RBFs (``memformers.memory.rbf``), so reading it costs
O(N) whatever the length of the past. Per head h and query q (paper eqs. 7-12):

    K = B W_K,  V = B W_V                           (N x d each, own projections)
    s = K q / sqrt(d)                               (N scores)
    mu = sigmoid(w_mu . s),  sigma^2 = max(softplus(w_sigma . s), sigma_min)
    r_j = E_{N(mu, sigma^2)}[psi_j] = N(mu; mu_j, sigma^2 + sigma_j^2)
    c = V^T r                                       (d)
    out = local_out + c                             (added to the short-term / XL output)

Unbounded memory update when a segment is committed (paper section 3.3): sample M
points of the old signal, contract them into [0, tau], place the segment's real
tokens evenly in [tau, 1] and refit B by ridge regression; an empty LTM fits the
segment over [0, 1]. With *sticky memories* the M sample positions follow the
attention density of this segment's reads (a histogram of the Gaussians summed over
heads and queries) via deterministic inverse-CDF quantiles, and the samples are
placed evenly in [0, tau], so much-attended regions keep more resolution.

The stored coefficients are detached (no gradient into the past). Gradients reach
W_K, W_V, w_mu, w_sigma and the queries through the closed forms.

Note: this layer writes the current segment into the LTM after reading, so with an
XL cache the previous segment is both in the cache and in the LTM (the paper moves
vectors into the LTM when they leave the short-term memory instead).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memformers.errors import MemformersError
from memformers.memory import rbf
from memformers.memory.base import AttentionMemory
from memformers.memory.configs import ContinuousConfig


def attention_density(
    scores: torch.Tensor,  # (B, H, L, N)
    w_mu: torch.Tensor,  # (H, N)
    w_sigma: torch.Tensor,  # (H, N)
    sigma_min: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # mu, sigma^2: (B, H, L) each
    """mu = sigmoid(w_mu . s), sigma^2 = softplus(w_sigma . s) clamped >= sigma_min."""
    mu = torch.sigmoid(torch.einsum("bhln,hn->bhl", scores, w_mu))
    var = F.softplus(torch.einsum("bhln,hn->bhl", scores, w_sigma)).clamp(min=sigma_min)
    return mu, var


def gaussian_kl(mu: torch.Tensor, var: torch.Tensor, mu0: float, sigma0: float) -> torch.Tensor:
    """KL(N(mu, var) || N(mu0, sigma0^2)), elementwise."""
    v0 = sigma0**2
    return 0.5 * (var / v0 - torch.log(var / v0) - 1.0 + (mu - mu0) ** 2 / v0)


class ContinuousMemory(AttentionMemory):
    state_kind = "continuous"
    carried = ("coef", "filled", "hist")  # all rebound, never written in place
    extra_inputs = ("x", "aux_losses")  # the LTM stores the layer input x, not k or v

    def __init__(self, cfg: ContinuousConfig, *, n_heads: int, head_dim: int, d_model: int):
        super().__init__()
        if cfg.n_basis <= 0 or not cfg.widths or cfg.n_basis % len(cfg.widths):
            raise MemformersError("continuous.n_basis must be a positive multiple of len(widths)")
        if not (0 < cfg.tau < 1 and cfg.sigma_min > 0 and cfg.kl_sigma0 > 0):
            raise MemformersError("continuous: need 0 < tau < 1, sigma_min > 0, kl_sigma0 > 0")
        self.cfg = cfg
        self.n_heads, self.head_dim, self.d_model = n_heads, head_dim, d_model
        N = cfg.n_basis
        self.key = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.value = nn.Linear(d_model, n_heads * head_dim, bias=False)
        bound = 1.0 / math.sqrt(N)  # nn.Linear(N, 1)'s default init, per head
        self.w_mu = nn.Parameter(torch.empty(n_heads, N).uniform_(-bound, bound))
        self.w_sigma = nn.Parameter(torch.empty(n_heads, N).uniform_(-bound, bound))
        mu, sigma = rbf.basis_params(N, cfg.widths)
        self.register_buffer("basis_mu", mu, persistent=False)  # (N,)
        self.register_buffer("basis_sigma", sigma, persistent=False)  # (N,)
        # per-stream state
        self.coef: torch.Tensor | None = None  # (B, N, e) detached
        self.filled: torch.Tensor | None = None  # (B,) bool: LTM non-empty
        self.hist: torch.Tensor | None = None  # (B, bins) last attention histogram (sticky)
        self._operators: dict[tuple[bytes, bytes], torch.Tensor] = {}  # ridge G by design

    # ----------------------------------------------------------------- state

    def allocate(self, batch_size: int, device: torch.device | str) -> None:
        N, e = self.cfg.n_basis, self.d_model
        self.coef = torch.zeros(batch_size, N, e, device=device)
        self.filled = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.hist = torch.zeros(batch_size, self.cfg.sticky_bins, device=device)

    def reset(self, streams: torch.Tensor) -> None:
        if self.coef is None:
            return
        s = streams.to(self.coef.device)
        # out of place: the old tensors may still be saved for a pending backward
        self.coef = torch.where(s[:, None, None], torch.zeros_like(self.coef), self.coef)
        self.filled = self.filled & ~s
        self.hist = torch.where(s[:, None], torch.zeros_like(self.hist), self.hist)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.coef is None:
            return {}
        return {"coef": self.coef.contiguous(), "filled": self.filled.contiguous(),
                "hist": self.hist.contiguous()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            self.coef = self.filled = self.hist = None
            return
        dev = self.basis_mu.device if self.coef is None else self.coef.device
        coef = tensors["coef"]
        if tuple(coef.shape[1:]) != (self.cfg.n_basis, self.d_model):
            raise MemformersError(f"continuous memory state has shape {tuple(coef.shape)}, "
                                  f"expected (B, {self.cfg.n_basis}, {self.d_model})")
        self.coef = coef.to(dev, torch.float32).clone()
        self.filled = tensors["filled"].to(dev, torch.bool).clone()
        self.hist = tensors["hist"].to(dev, torch.float32).clone()

    def state_bytes_per_stream(self) -> int:
        return (self.cfg.n_basis * self.d_model + self.cfg.sticky_bins) * 4 + 1

    # ----------------------------------------------------------------- forward

    def forward(
        self,
        q: torch.Tensor,  # (B, H, L, d)
        k: torch.Tensor,  # (B, H, L, d) unused: the LTM has its own keys
        v: torch.Tensor,  # (B, H, L, d) unused
        local_out: torch.Tensor,  # (B, H, L, d)
        mask: torch.Tensor,  # (B, L) bool, real tokens
        commit: bool,
        *,
        x: torch.Tensor,  # (B, L, D) layer input (after the pre-norm): what the LTM stores
        aux_losses: list[torch.Tensor] | None = None,  # gets kl_weight * KL (eq. 15)
    ) -> torch.Tensor:  # (B, H, L, d)
        B, L, _ = x.shape
        if self.coef is None:
            self.allocate(B, x.device)
        if self.coef.shape[0] != B:
            raise MemformersError(f"continuous memory holds {self.coef.shape[0]} streams, "
                                  f"got a batch of {B}; call allocate() first")
        with torch.autocast(device_type=x.device.type, enabled=False):
            c, mu, var = self.read(q.float())  # (B, H, L, d), (B, H, L) x 2
            kl = self._kl(mu, var, mask)
            if kl is not None and aux_losses is not None:
                aux_losses.append(kl)
            if commit:
                self.write(x.detach().float(), mu.detach(), var.detach(), mask)
        return local_out + c.to(local_out.dtype)

    def read(self, q: torch.Tensor):
        """Context c = V^T r from the LTM for queries q (B, H, L, d); c = 0 for empty LTMs."""
        B, H, _, d = q.shape
        N = self.cfg.n_basis
        w = self.key.weight
        coef = self.coef.to(w.dtype)
        keys = self.key(coef).float().view(B, N, H, d).transpose(1, 2)  # (B, H, N, d)
        values = self.value(coef).float().view(B, N, H, d).transpose(1, 2)  # (B, H, N, d)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(d)  # (B, H, L, N)
        mu, var = attention_density(scores, self.w_mu.float(), self.w_sigma.float(),
                                    self.cfg.sigma_min)
        r = rbf.gaussian_expectation(mu, var, self.basis_mu, self.basis_sigma)  # (B, H, L, N)
        c = r @ values  # (B, H, L, d)
        c = torch.where(self.filled[:, None, None, None], c, torch.zeros_like(c))
        return c, mu, var

    def _kl(self, mu, var, mask) -> torch.Tensor | None:
        """kl_weight * mean KL over real queries of streams with a non-empty LTM."""
        if self.cfg.kl_weight <= 0:
            return None
        wq = (mask & self.filled[:, None]).float()[:, None, :].expand_as(mu)  # (B, H, L)
        if not bool(wq.any()):
            return None
        kl = gaussian_kl(mu, var, self.cfg.kl_mu0, self.cfg.kl_sigma0)
        return self.cfg.kl_weight * (kl * wq).sum() / wq.sum()

    def _fit(self, X: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Ridge coefficients (B, N, e) of X (B, n, e) at times t with weights w (B, n).

        The fit times depend only on whether the memory is filled and how many real
        tokens the segment has, so in the common case (every stream with a full segment)
        all rows share one design: then coef = G X with G = ``rbf.ridge_operator``,
        cached by design (one N x N solve per design instead of one per stream and
        segment). Mixed designs (padding, fresh documents) solve per stream.
        """
        cfg = self.cfg
        if not bool(((t == t[:1]).all() & (w == w[:1]).all()).item()):
            return rbf.ridge_fit(X, t, w, self.basis_mu, self.basis_sigma, cfg.ridge_lambda)
        key = (t[0].double().cpu().numpy().tobytes(), w[0].double().cpu().numpy().tobytes())
        G = self._operators.get(key)
        if G is None:
            if len(self._operators) >= 16:  # a handful of designs recur; bound the cache
                self._operators.pop(next(iter(self._operators)))
            G = rbf.ridge_operator(t[0], w[0], self.basis_mu, self.basis_sigma,
                                   cfg.ridge_lambda).float()  # (N, n)
            self._operators[key] = G
        return (G @ X.float()).to(X.dtype)  # (B, N, e)

    @torch.no_grad()
    def write(self, x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, mask: torch.Tensor):
        """Unbounded memory update with this segment's real tokens (paper section 3.3)."""
        cfg = self.cfg
        B, L, _ = x.shape
        M, tau = cfg.n_samples, cfg.tau
        filled = self.filled
        n_new = mask.sum(1)  # (B,)

        # Sticky memories: histogram of this read's attention density on the old signal.
        if cfg.sticky:
            H = mu.shape[1]
            wq = mask.float()[:, None, :].expand(B, H, L).reshape(B, H * L)
            hist = rbf.histogram_mass(mu.reshape(B, -1), var.sqrt().reshape(B, -1), wq,
                                      cfg.sticky_bins)
            upd = filled & (n_new > 0)
            self.hist = torch.where(upd[:, None], hist, self.hist)
            t_src = rbf.histogram_quantiles(self.hist, M)  # (B, M)
        else:
            t_src = ((torch.arange(M, device=x.device) + 0.5) / M).expand(B, M)

        # Old signal sampled at t_src, placed evenly in [0, tau].
        old = rbf.evaluate(self.coef, t_src, self.basis_mu, self.basis_sigma)  # (B, M, e)
        t_old = (tau * (torch.arange(M, device=x.device) + 0.5) / M).expand(B, M)
        w_old = filled.float()[:, None].expand(B, M)

        # New real tokens evenly in [tau, 1] (or [0, 1] for an empty LTM), in order.
        rank = (mask.cumsum(1) - 1).float()  # (B, L)
        start = torch.where(filled, tau, 0.0)[:, None]  # (B, 1)
        t_new = start + (1.0 - start) * (rank + 0.5) / n_new.clamp(min=1)[:, None]

        X = torch.cat([old, x], 1)  # (B, M + L, e)
        t = torch.cat([t_old, t_new], 1)
        w = torch.cat([w_old, mask.float()], 1)
        if cfg.pad_fit:
            n_fit = w.sum(1).long()
            t_pad, w_pad = rbf.padding_points(n_fit, int((n_fit // 2).max()),
                                              int((n_fit - n_fit // 2).max()))
            X = torch.cat([X, X.new_zeros(B, t_pad.shape[1], X.shape[2])], 1)
            t = torch.cat([t, t_pad.to(t.dtype)], 1)
            w = torch.cat([w, w_pad.to(w.dtype)], 1)
        coef = self._fit(X, t, w)

        has_new = n_new > 0  # a stream without real tokens keeps its memory as is
        self.coef = torch.where(has_new[:, None, None], coef, self.coef)
        self.filled = filled | has_new
