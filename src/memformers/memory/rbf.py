"""Gaussian radial basis functions: the maths of the infinity-former's continuous memory.

Martins et al. (ACL 2022), section 3. A sequence of n vectors X (n x e) placed at
times t_i in [0, 1] becomes a continuous signal

    X(t) = B^T psi(t),        psi_j(t) = N(t; mu_j, sigma_j^2)   (normalised RBFs)

with B (N x e) the ridge-regression solution (paper eq. 7)

    B^T = X^T F^T (F F^T + lambda I)^-1,    F = [psi(t_1), ..., psi(t_n)]  (N x n)

and attention over the signal is a Gaussian density N(mu, sigma^2) over t, whose
expectation of each basis function has the closed form (paper eq. 9-10)

    r_j = E_{N(mu, sigma^2)}[psi_j] = N(mu; mu_j, sigma^2 + sigma_j^2).

Everything here is batched over streams and differentiable (autograd through the
closed forms); nothing here holds state.
"""

from __future__ import annotations

import math

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def basis_params(n_basis: int, widths: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres and widths of the N RBFs: linspace(0, 1, N / len(widths)) for each width.

    Returns ``(mu, sigma)``, each (N,), ordered centre-major (all widths of one centre
    next to each other), as in the official code's meshgrid.
    """
    per_width = n_basis // len(widths)
    centres = torch.linspace(0.0, 1.0, per_width, dtype=torch.float64)
    mu = centres[:, None].expand(per_width, len(widths)).reshape(-1)
    sigma = torch.tensor(widths, dtype=torch.float64)[None, :].expand(per_width, -1).reshape(-1)
    return mu.float().contiguous(), sigma.float().contiguous()


def gaussian_pdf(t: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """N(t; mean, var), broadcasting."""
    return torch.exp(-0.5 * (t - mean) ** 2 / var - 0.5 * torch.log(var) - _LOG_SQRT_2PI)


def rbf_matrix(t: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """psi_j(t_i) for times t (..., n): returns F (..., N, n)."""
    return gaussian_pdf(t[..., None, :], mu[:, None], (sigma**2)[:, None])


def ridge_operator(
    t: torch.Tensor,  # (..., n) fit times
    w: torch.Tensor,  # (..., n) 1 for points to fit, 0 to ignore (padding tokens)
    mu: torch.Tensor,  # (N,)
    sigma: torch.Tensor,  # (N,)
    lam: float,
) -> torch.Tensor:  # (..., N, n) float64
    """G = (F W F^T + lambda I)^-1 F W, so that the ridge fit of any X at these times is G X
    (paper eq. 7). It depends only on the times: the official code precomputes it once,
    as the fit times of a full segment never change. With 0/1 weights this is exactly
    eq. 7 on the points with w = 1; lambda <= 0 gives plain least squares (minimum norm
    where under-determined). Solved in float64 (F F^T of narrow normalised RBFs is badly
    conditioned)."""
    F = rbf_matrix(t.double(), mu.double(), sigma.double())  # (..., N, n)
    Fw = F * w.double()[..., None, :]
    A = Fw @ F.transpose(-1, -2)  # (..., N, N)
    if lam <= 0:
        return torch.linalg.pinv(A) @ Fw
    A = A + lam * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(A, Fw)


def ridge_fit(
    X: torch.Tensor,  # (B, n, e) vectors to fit
    t: torch.Tensor,  # (B, n) their times
    w: torch.Tensor,  # (B, n) 1 for points to fit, 0 to ignore (padding tokens)
    mu: torch.Tensor,  # (N,)
    sigma: torch.Tensor,  # (N,)
    lam: float,
) -> torch.Tensor:  # (B, N, e)
    """Weighted ridge regression B = (F W F^T + lambda I)^-1 F W X (paper eq. 7), per
    stream (``ridge_operator`` applied to X in float64), returned in X's dtype."""
    return (ridge_operator(t, w, mu, sigma, lam) @ X.double()).to(X.dtype)


def padding_points(n: torch.Tensor, max_left: int, max_right: int):
    """The official code's padding: zero targets around the fitted points.

    For a stream with n fitted points it fits 2n evenly spaced points over
    [-0.5, 1.5] (spacing 1/n) and keeps only the middle n as data: the n // 2 points
    left of 0 and n - n // 2 points right of 1 get target 0, so the signal decays to
    zero outside [0, 1] instead of being free there. ``n`` is (B,) integers.
    Returns times (B, max_left + max_right) and 0/1 weights of the same shape.
    """
    nf = n.clamp(min=1).double()[:, None]  # (B, 1)
    i_l = torch.arange(max_left, device=n.device, dtype=torch.float64)[None]
    i_r = torch.arange(max_right, device=n.device, dtype=torch.float64)[None]
    t = torch.cat([-0.5 + (i_l + 0.5) / nf, 1.0 + (i_r + 0.5) / nf], 1)
    w = torch.cat([i_l < (n // 2)[:, None], i_r < (n - n // 2)[:, None]], 1)
    return t, w.double()


def evaluate(coef: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor):
    """The signal X(t) = B^T psi(t): coef (B, N, e), t (B, m) -> (B, m, e)."""
    F = rbf_matrix(t.to(coef.dtype), mu.to(coef.dtype), sigma.to(coef.dtype))  # (B, N, m)
    return F.transpose(1, 2) @ coef


def gaussian_expectation(
    mean: torch.Tensor,  # (...,) mu of the attention density
    var: torch.Tensor,  # (...,) sigma^2 of the attention density
    mu: torch.Tensor,  # (N,) basis centres
    sigma: torch.Tensor,  # (N,) basis widths
) -> torch.Tensor:  # (..., N)
    """r_j = E_{t ~ N(mean, var)}[psi_j(t)] = N(mean; mu_j, var + sigma_j^2) (paper eq. 10)."""
    return gaussian_pdf(mean[..., None], mu, var[..., None] + sigma**2)


def histogram_mass(
    mean: torch.Tensor,  # (B, K) Gaussian means
    std: torch.Tensor,  # (B, K) Gaussian standard deviations
    weight: torch.Tensor,  # (B, K) weight of each Gaussian (0 = ignore)
    bins: int,
) -> torch.Tensor:  # (B, bins)
    """Mass of a weighted sum of Gaussians in each of ``bins`` equal bins of [0, 1]."""
    edges = torch.linspace(0.0, 1.0, bins + 1, device=mean.device, dtype=mean.dtype)
    z = (edges - mean[..., None]) / (std[..., None] * math.sqrt(2.0))  # (B, K, bins+1)
    cdf = 0.5 * (1.0 + torch.erf(z))
    return ((cdf[..., 1:] - cdf[..., :-1]) * weight[..., None]).sum(1)


def histogram_quantiles(hist: torch.Tensor, m: int) -> torch.Tensor:
    """Deterministic inverse-CDF sampling: m positions in [0, 1] following ``hist``.

    ``hist`` (B, K) holds non-negative bin masses on K equal bins of [0, 1] (a row
    of zeros means uniform). Position i is the (i + 0.5) / m quantile of the
    piecewise-uniform density, so a bin holding a fraction p of the mass receives
    about p * m positions, evenly spread inside it. Returns (B, m), sorted.
    """
    B, K = hist.shape
    h = hist.double().clamp(min=0)
    total = h.sum(1, keepdim=True)
    p = torch.where(total > 0, h / total.clamp(min=1e-300), torch.full_like(h, 1.0 / K))
    cdf = p.cumsum(1)  # (B, K)
    u = ((torch.arange(m, device=hist.device, dtype=torch.float64) + 0.5) / m)
    u = u[None].expand(B, m).contiguous()
    k = torch.searchsorted(cdf, u).clamp(max=K - 1)  # first bin whose cdf reaches u
    pk = p.gather(1, k)
    frac = ((u - (cdf.gather(1, k) - pk)) / pk.clamp(min=1e-300)).clamp(0.0, 1.0)
    return ((k.double() + frac) / K).to(hist.dtype)
