"""Infini-attention probes (diagnostics/infini_probe.py): capacity, sensitivity, needle
share."""

import dataclasses

import numpy as np
import torch

from memformers.config import load_config
from memformers.data.tokenizer import ByteTokenizer
from memformers.diagnostics.infini_probe import (
    capacity_probe,
    diagnose_passkey,
    make_passkey_pair,
    needle_share,
    write_and_read,
)
from memformers.memory.infini import sigma
from memformers.model import MemformerLM
from tests.conftest import TINY_MODEL

D = 32  # head_dim of configs/demo/base.toml


def cosines(got, want):
    return torch.nn.functional.cosine_similarity(got, want, dim=-1)


def one_hot_keys(n, d, big=9.0):
    """(1, n, d) keys whose sigma features are (big + 1) * e_i: sigma(-1e4) = 0 in float32."""
    k = torch.full((1, n, d), -1e4)
    k[0, torch.arange(n), torch.arange(n)] = big
    return k


def test_linear_memory_with_orthogonal_sigma_features_returns_every_value():
    k = one_hot_keys(D, D)
    assert torch.equal(sigma(k)[0], 10.0 * torch.eye(D))
    v = torch.randn(1, D, D, generator=torch.Generator().manual_seed(0))
    for chunk in (256, 5):  # one segment, and several segments as the model writes
        got = write_and_read(k, v, k, update="linear", chunk=chunk)  # (1, D, D)
        assert (cosines(got, v) > 0.99).all()
    # control: Gaussian keys (sigma features all positive, far from orthogonal) cannot
    g = torch.Generator().manual_seed(1)
    kg, vg = torch.randn(8, D, D, generator=g), torch.randn(8, D, D, generator=g)
    assert cosines(write_and_read(kg, vg, kg, update="linear"), vg).mean() < 0.9


def test_capacity_probe_cosine_falls_with_the_number_of_bindings():
    rows = capacity_probe([16, 1024], D, updates=("linear",), kinds=("gaussian",), trials=32)
    cos = {r["N"]: r["cosine"] for r in rows}
    assert cos[16] > cos[1024] + 0.1
    assert all(abs(r["uniform_share"] - 1 / r["N"]) < 1e-12 for r in rows)


def test_needle_share_equals_brute_force():
    g = torch.Generator().manual_seed(2)
    B, H, L, N, d = 2, 3, 4, 7, 5
    sq = sigma(torch.randn(B, H, L, d, generator=g))
    sk = sigma(torch.randn(B, H, N, d, generator=g))
    needle = [1, 4, 5]
    got = needle_share(sq, sk, needle)
    assert got.shape == (B, H, L)
    for b in range(B):
        for h in range(H):
            for t in range(L):
                w = [float(sum(sq[b, h, t, i] * sk[b, h, j, i] for i in range(d)))
                     for j in range(N)]
                want = sum(w[j] for j in needle) / sum(w)
                assert abs(got[b, h, t].item() - want) < 1e-5


def test_passkey_pair_differs_only_in_the_key_digits():
    tok = ByteTokenizer()
    pair = make_passkey_pair(tok, 1024, 0.5, np.random.default_rng(0))
    assert pair.tokens.shape == (2, 1024)
    assert all(a != b for a, b in zip(*pair.keys))
    diff = np.flatnonzero(pair.tokens[0] != pair.tokens[1])
    fed_digits = pair.answer_positions[1:]  # the answer's digits fed under teacher forcing
    assert diff.tolist() == sorted(pair.needle_positions.tolist() + fed_digits.tolist())
    assert len(pair.needle_positions) == 10  # the key twice in the needle
    for row, key in enumerate(pair.keys):
        assert tok.decode(pair.targets[row, pair.answer_positions].tolist()) == key
        assert key in tok.decode(pair.tokens[row, pair.needle_positions[:5]].tolist())


def tiny_model():
    cfg = load_config(None, TINY_MODEL + ["model.infini.layers=[1]", "model.xl_cache=true"])
    torch.manual_seed(0)
    return MemformerLM(cfg.model), cfg.data.segment_len, cfg.model.n_layers


def test_readout_sensitivity_zero_for_identical_prompts_positive_for_another_needle():
    model, seg, n_layers = tiny_model()
    pair = make_passkey_pair(ByteTokenizer(), 12 * seg, 0.5, np.random.default_rng(3))
    same = dataclasses.replace(pair, tokens=pair.tokens[[0, 0]], targets=pair.targets[[0, 0]])
    r = diagnose_passkey(model, [same], seg)
    assert r["needle_in_memory"]
    (lay,) = r["layers"].values()
    for measure in ("readout_sensitivity", "readout_sensitivity_first"):
        for values in lay[measure].values():
            assert values == [0.0] * 4

    # B = A with only the needle's digits changed (the answer fed is A's): the needle
    # lies beyond what the XL caches reach, so local attention is bitwise the same
    # and any difference at the answer comes through the Infini memory.
    needle_only = pair.tokens[[0, 0]].copy()
    needle_only[1, pair.needle_positions] = pair.tokens[1, pair.needle_positions]
    other = dataclasses.replace(pair, tokens=needle_only, targets=pair.targets[[0, 0]])
    r = diagnose_passkey(model, [other], seg)
    assert r["needle_segments_back"] > n_layers
    (lay,) = r["layers"].values()
    s = lay["readout_sensitivity"]
    assert s["local"] == [0.0] * 4
    assert all(x > 0 for x in s["memory"] + s["memory_same_query"] + s["output"])
    assert lay["checks"]["a_mem_vs_module_max_abs"] < 1e-5
    assert lay["checks"]["z_rel_err"] < 1e-5
    share, uniform = np.asarray(lay["needle_share"]), lay["uniform_share"]
    assert uniform == 10 / (11 * seg) and ((share > 0) & (share < 1)).all()
