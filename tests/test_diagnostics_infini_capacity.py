"""The Infini-attention capacity experiment (diagnostics/infini_capacity.py)."""

import pytest
import torch

from memformers.diagnostics.infini_capacity import (
    CapacityConfig,
    CapacityHead,
    make_streams,
    run_capacity,
)


def test_streams_hold_one_binding_and_end_with_its_key():
    cfg = CapacityConfig(n=128, segment=32)
    tokens, value = make_streams(cfg, 8, torch.Generator().manual_seed(0))
    K = cfg.n_keys
    assert tokens.shape == (8, 128 + 32)
    for row, v in zip(tokens, value):
        keys = (row[:128] < K).nonzero().flatten()
        assert len(keys) == 1  # one needle among filler
        p = int(keys[0])
        assert row[p + 1] == K + v and row[-1] == row[p]  # its value, then the query


@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("normalise", [True, False])
def test_segment_updates_equal_the_unrolled_recurrence(update, normalise):
    """Gated writes, learned features: M and z after every segment equal a token-by-token
    loop over the paper's formulas (delta: every token corrected by M_{s-1})."""
    cfg = CapacityConfig(n=96, segment=32, d=8, update=update, feature="learned",
                         write_gate=True, normalise=normalise)
    torch.manual_seed(0)
    head = CapacityHead(cfg)
    tokens, _ = make_streams(cfg, 3, torch.Generator().manual_seed(1))
    sq, sk, v, g = head.features(tokens)
    B, d = 3, cfg.d
    M, z = torch.zeros(B, d, d), torch.zeros(B, d)
    Mr, zr = torch.zeros(B, d, d), torch.zeros(B, d)
    for s in range(0, cfg.n, cfg.segment):
        M, z = head.update(M, z, sk[:, s:s + 32], v[:, s:s + 32], g[:, s:s + 32])
        M_prev, z_prev = Mr.clone(), zr.clone()
        for t in range(s, s + 32):
            kt, vt, gt = sk[:, t], v[:, t], g[:, t]  # (B, d), (B, d), (B, 1)
            if update == "delta":
                den = (kt * z_prev).sum(-1, keepdim=True).clamp_min(cfg.eps)
                vt = vt - torch.einsum("bi,bij->bj", kt, M_prev) / den
            Mr = Mr + gt[:, :, None] * kt[:, :, None] * vt[:, None, :]
            zr = zr + gt * kt
        assert torch.allclose(M, Mr, atol=1e-5) and torch.allclose(z, zr, atol=1e-5)
    out = head.read(sq[:, -1:], M, z)
    want = torch.einsum("bi,bij->bj", sq[:, -1], M)
    if normalise:
        want = want / (sq[:, -1] * z).sum(-1, keepdim=True).clamp_min(cfg.eps)
    assert torch.allclose(out[:, 0], want, atol=1e-5)


def test_one_binding_in_one_segment_is_read_back_above_chance():
    r = run_capacity(CapacityConfig(n=32, segment=32, d=16, steps=150, eval_streams=256))
    assert r["accuracy"] > 3 * r["chance"], r["accuracy"]
