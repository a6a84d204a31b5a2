"""Infini-attention (docs/infini.md) against brute-force references."""

import copy
import math
import time

import numpy as np
import pytest
import torch

from memformers.config import ModelConfig, TrainConfig, load_config
from memformers.data.streaming import Batch
from memformers.memory.configs import InfiniConfig
from memformers.memory.infini import InfiniMemory, sigma
from memformers.memory.state import collect_state_tensors, load_collected_state_tensors
from memformers.model import MemformerLM, lm_loss
from memformers.model.attention import Attention
from memformers.model.position import RelativePositionBias, Rotary
from memformers.train.optim import build_optimizers
from memformers.train.trainer import Trainer
from tests.conftest import TINY_MODEL

B, H, L, D = 3, 2, 5, 4


def gate_group(model) -> list[torch.nn.Parameter]:
    """The Infini-attention gates as the trainer's optimiser groups them ("infini_gate")."""
    opt = build_optimizers(model, TrainConfig())[0]
    return [p for g in opt.param_groups if g["name"] == "infini_gate" for p in g["params"]]


def make(update="linear", **kw) -> InfiniMemory:
    mem = InfiniMemory(InfiniConfig(layers=[0], update=update, **kw), n_heads=H, head_dim=D,
                       d_model=H * D)
    mem.allocate(B, "cpu")
    return mem


def segments(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(B, H, L, D, generator=g, dtype=dtype) for _ in range(3))
            for _ in range(n)]


def run(mem, segs, mask=None, commit=True):
    """A_mem of each segment: with local_out = 0 the output is sigmoid(beta) * A_mem."""
    g = torch.sigmoid(mem.gate.detach()).view(1, H, 1, 1)
    mask = torch.ones(B, L, dtype=torch.bool) if mask is None else mask
    outs = []
    for q, k, v in segs:
        out = mem(q, k, v, torch.zeros_like(v), mask, commit)
        outs.append((out / g).detach())
    return outs


def sig(x):
    return np.where(x > 0, x + 1.0, np.exp(x))  # ELU + 1


def test_linear_rule_equals_closed_form_over_concatenation():
    S = 4
    mem = make("linear")
    segs = segments(S)
    outs = run(mem, [(q.float(), k.float(), v.float()) for q, k, v in segs])
    q, k, v = (np.concatenate([s[i].numpy() for s in segs], axis=2) for i in range(3))
    for s in range(S):  # segment s reads exactly the tokens of segments < s
        prev = slice(0, s * L)
        M = np.einsum("bhtk,bhtv->bhkv", sig(k[:, :, prev]), v[:, :, prev])
        z = sig(k[:, :, prev]).sum(2)
        sq = sig(q[:, :, s * L:(s + 1) * L])
        num, den = sq @ M, (sq @ z[..., None])
        want = num / den if s > 0 else np.zeros_like(num)
        np.testing.assert_allclose(outs[s].numpy(), want, rtol=1e-4, atol=1e-5)
    M_all = np.einsum("bhtk,bhtv->bhkv", sig(k), v)
    np.testing.assert_allclose(mem.M.numpy(), M_all, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mem.z.numpy(), sig(k).sum(2), rtol=1e-5)


def delta_reference(segs, eps, phi=sig, F=D):
    """Token-by-token python loops for eqs. (3), (5), float64 (features ``phi`` of size F)."""
    M = np.zeros((B, H, F, D))
    z = np.zeros((B, H, F))
    outs = []
    for q, k, v in segs:
        q, k, v = q.numpy(), k.numpy(), v.numpy()
        out = np.zeros((B, H, L, D))
        newM, newz = M.copy(), z.copy()
        for b in range(B):
            for h in range(H):
                for t in range(L):
                    sq = phi(q[b, h, t])
                    out[b, h, t] = (sq @ M[b, h]) / max(sq @ z[b, h], eps)
                    sk = phi(k[b, h, t])
                    old = (sk @ M[b, h]) / max(sk @ z[b, h], eps)  # uses M_{s-1}
                    newM[b, h] += np.outer(sk, v[b, h, t] - old)
                    newz[b, h] += sk
        M, z = newM, newz
        outs.append(out)
    return outs, M, z


def test_delta_rule_equals_loop_reference():
    mem = make("delta")
    segs = segments(4, seed=1)
    outs = run(mem, [(q.float(), k.float(), v.float()) for q, k, v in segs])
    want, M, z = delta_reference(segs, mem.cfg.eps)
    for got, ref in zip(outs, want):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mem.M.numpy(), M, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mem.z.numpy(), z, rtol=1e-5)
    lin = make("linear")
    run(lin, [(q.float(), k.float(), v.float()) for q, k, v in segs])
    assert not torch.allclose(lin.M, mem.M, atol=1e-2)  # the delta term matters here


def test_learned_features_start_as_the_papers():
    segs = [(q.float(), k.float(), v.float()) for q, k, v in segments(3, seed=4)]
    torch.manual_seed(0)
    paper, learned = make("delta"), make("delta", feature="learned")
    for got, want in zip(run(learned, segs), run(paper, segs)):
        torch.testing.assert_close(got, want)


def test_learned_features_delta_rule_equals_loop_reference():
    """phi(x) = sigma(x A + gelu(x W1) W2) into F = 2 D features, weights made non-trivial,
    against the token loop with phi computed in numpy from the same weights."""
    torch.manual_seed(3)
    F = 2 * D
    mem = make("delta", feature="learned", feature_dim=F)
    with torch.no_grad():
        for prm in mem.feature_mlp.parameters():
            prm.normal_(0, 0.5)
    A = mem.feature_proj.detach().double().numpy()
    W1, b1 = (t.detach().double().numpy() for t in (mem.feature_mlp[0].weight,
                                                    mem.feature_mlp[0].bias))
    W2, b2 = (t.detach().double().numpy() for t in (mem.feature_mlp[2].weight,
                                                    mem.feature_mlp[2].bias))

    def phi(x):
        h = x @ W1.T + b1
        gelu = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
        return sig(x @ A + gelu @ W2.T + b2)

    segs = segments(4, seed=5)
    outs = run(mem, [(q.float(), k.float(), v.float()) for q, k, v in segs])
    want, M, z = delta_reference(segs, mem.cfg.eps, phi, F)
    for got, ref in zip(outs, want):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-5)
    assert mem.M.shape == (B, H, F, D) and mem.state_bytes_per_stream() == H * F * (D + 1) * 4
    np.testing.assert_allclose(mem.M.detach().numpy(), M, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mem.z.detach().numpy(), z, rtol=1e-5)


def test_learned_features_are_trained_through_the_memory():
    mem = make("delta", feature="learned", feature_dim=2 * D)
    (q1, k1, v1), (q2, k2, v2) = [(q.float(), k.float(), v.float()) for q, k, v in segments(2)]
    ones = torch.ones(B, L, dtype=torch.bool)
    mem(q1, k1, v1, torch.zeros_like(v1), ones, True)
    out = mem(q2, k2, v2, torch.zeros_like(v2), ones, True)
    out.square().sum().backward()
    assert mem.feature_mlp[2].weight.grad.abs().sum() > 0  # zero-init W2 still gets a gradient
    assert mem.feature_proj.grad.abs().sum() > 0


def test_delta_rule_leaves_an_exactly_stored_binding_unchanged():
    """sigma(K) rows one-hot (sigma(-inf) = 0, sigma(0) = 1) and V = sigma(K) M / (sigma(K) z):
    M already returns V for these keys, so the delta term is 0 and M stays; z still
    grows by sum_t sigma(K_t) (docs/infini.md, the normaliser row: both rules)."""
    g = torch.Generator().manual_seed(11)
    M = torch.randn(B, H, D, D, generator=g)
    z = torch.rand(B, H, D, generator=g) + 0.5
    slot = torch.arange(L) % D  # token t stores under key e_{t mod D} (two tokens share e_0)
    k = torch.full((B, H, L, D), float("-inf"))
    k[:, :, torch.arange(L), slot] = 0.0
    sk = sigma(k)
    assert torch.equal(sk, torch.nn.functional.one_hot(slot, D).float().expand(B, H, L, D))
    v = (sk @ M) / (sk @ z.unsqueeze(-1))  # (B, H, L, D): exactly what M retrieves
    q = torch.randn(B, H, L, D, generator=g)
    ones = torch.ones(B, L, dtype=torch.bool)

    def write(update, values):
        mem = make(update)
        mem.load_state_tensors({"M": M, "z": z})
        mem(q, k, values, torch.zeros_like(values), ones, True)
        return mem

    mem = write("delta", v)
    assert torch.equal(mem.M, M)
    assert torch.allclose(mem.z, z + sk.sum(2)) and not torch.allclose(mem.z, z)
    assert not torch.allclose(write("linear", v).M, M)  # linear adds sigma(K)^T V again
    mem = write("delta", v + 1.0)  # a binding NOT stored yet: only the difference is added
    assert torch.allclose(mem.M, M + sk.transpose(-2, -1) @ torch.ones_like(v))


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_segment_never_reads_its_own_tokens(update):
    segs = [tuple(t.float() for t in s) for s in segments(3, seed=2)]
    changed = list(segs)
    q2, k2, v2 = changed[1]
    changed[1] = (q2, k2 + torch.randn_like(k2), v2 + torch.randn_like(v2))
    a, b = run(make(update), segs), run(make(update), changed)
    assert torch.all(a[0] == 0)  # fresh memory retrieves nothing
    assert torch.allclose(a[1], b[1])  # segment 2 unaffected by its own k, v
    assert not torch.allclose(a[2], b[2], atol=1e-3)  # segment 3 sees them


def test_fresh_stream_output_is_gated_local_attention():
    mem = make(gate_init=1.5)
    q, k, v = (t.float() for t in segments(1)[0])
    local = torch.randn_like(v)
    out = mem(q, k, v, local, torch.ones(B, L, dtype=torch.bool), True)
    assert torch.allclose(out, (1 - torch.sigmoid(torch.tensor(1.5))) * local)
    assert torch.allclose(mem.gate_values(), torch.sigmoid(torch.full((H,), 1.5)))


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_reset_clears_exactly_flagged_streams(update):
    segs = [tuple(t.float() for t in s) for s in segments(3, seed=3)]
    mem = make(update)
    run(mem, segs[:2])
    M, z = mem.M.clone(), mem.z.clone()
    flag = torch.tensor([True, False, True])
    mem.reset(flag)
    assert torch.all(mem.M[flag] == 0) and torch.all(mem.z[flag] == 0)
    assert torch.equal(mem.M[~flag], M[~flag]) and torch.equal(mem.z[~flag], z[~flag])
    out = run(mem, segs[2:])[0]
    fresh = make(update)
    ref_fresh = run(fresh, segs[2:])[0]
    kept = make(update)
    ref_kept = run(kept, segs)[2]
    assert torch.allclose(out[flag], ref_fresh[flag])
    assert torch.allclose(out[~flag], ref_kept[~flag])


def test_reset_inside_a_graph_keeps_other_streams_differentiable():
    mem = make("delta")
    q, k, v = (t.float().requires_grad_() for t in segments(1, seed=4)[0])
    mem(q, k, v, torch.zeros_like(v), torch.ones(B, L, dtype=torch.bool), True)
    mem.reset(torch.tensor([True, False, False]))
    mem.M.sum().backward()
    assert torch.all(k.grad[0] == 0) and k.grad[1:].abs().sum() > 0


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_padding_is_never_written(update):
    segs = [tuple(t.float() for t in s) for s in segments(2, seed=5)]
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    noisy = [(q, k.clone(), v.clone()) for q, k, v in segs]
    for _, k, v in noisy:
        k[~mask[:, None, :, None].expand_as(k)] = 7.0
        v[~mask[:, None, :, None].expand_as(v)] = -9.0
    a, b = make(update), make(update)
    run(a, segs, mask)
    run(b, noisy, mask)
    assert torch.allclose(a.M, b.M) and torch.allclose(a.z, b.z)
    # stream 0 == writing only its 3 real tokens per segment
    short = make(update)
    short.allocate(1, "cpu")
    for q, k, v in segs:
        short(q[:1, :, :3], k[:1, :, :3], v[:1, :, :3], torch.zeros_like(v[:1, :, :3]),
              torch.ones(1, 3, dtype=torch.bool), True)
    assert torch.allclose(a.M[:1], short.M, atol=1e-5) and torch.allclose(a.z[:1], short.z)


def test_commit_false_leaves_state_untouched():
    mem = make("delta")
    segs = [tuple(t.float() for t in s) for s in segments(2, seed=6)]
    run(mem, segs[:1])
    M = mem.M.clone()
    run(mem, segs[1:], commit=False)
    assert torch.equal(mem.M, M)


def test_bptt_gradient_crosses_segments_until_detach():
    for detach in (False, True):
        mem = make("delta")
        (q1, k1, v1), (q2, k2, v2) = [tuple(t.float().requires_grad_() for t in s)
                                      for s in segments(2, seed=7)]
        ones = torch.ones(B, L, dtype=torch.bool)
        mem(q1, k1, v1, torch.zeros_like(v1), ones, True)
        if detach:
            mem.detach()
        out2 = mem(q2, k2, v2, torch.randn_like(v2), ones, True)
        out2.pow(2).sum().backward()
        assert mem.gate.grad is not None and mem.gate.grad.abs().sum() > 0
        assert q2.grad.abs().sum() > 0
        if detach:
            assert k1.grad is None and v1.grad is None
        else:
            assert k1.grad.abs().sum() > 0 and v1.grad.abs().sum() > 0


def test_state_save_load_round_trip():
    segs = [tuple(t.float() for t in s) for s in segments(3, seed=8)]
    a = make("delta")
    run(a, segs[:2])
    saved = {name: t.clone() for name, t in a.state_tensors().items()}
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in saved.values())
    b = make("delta")
    b.load_state_tensors(saved)
    assert torch.equal(run(a, segs[2:])[0], run(b, segs[2:])[0])
    assert torch.equal(a.M, b.M) and torch.equal(a.z, b.z)


def test_state_bytes_per_stream_matches_formula_and_tensors():
    mem = InfiniMemory(InfiniConfig(layers=[0]), n_heads=3, head_dim=6, d_model=18)
    mem.allocate(2, "cpu")
    assert mem.state_bytes_per_stream() == 3 * 6 * (6 + 1) * 4
    per_stream = sum(t[0].numel() * t.element_size() for t in mem.state_tensors().values())
    assert mem.state_bytes_per_stream() == per_stream


def test_state_stays_float32_under_bf16_autocast():
    mem = make("delta")
    q, k, v = (t.to(torch.bfloat16) for t in segments(1, seed=9)[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            out = mem(q, k, v, v, torch.ones(B, L, dtype=torch.bool), True)
    assert mem.M.dtype == torch.float32 and mem.z.dtype == torch.float32
    assert out.dtype == torch.bfloat16
    want = 2 * (torch.nn.functional.elu(k.float()) + 1).sum(2)
    assert torch.allclose(mem.z, want, rtol=1e-6)


@pytest.mark.parametrize("position", ["rope", "t5"])
def test_memory_path_has_no_position_encoding(position):
    """The same layer with and without its position encoding, on the same two segments
    (XL cache: segment 2's queries sit at positions L..2L-1): local attention changes,
    while the memory's inputs, its retrieval A_mem and its state do not."""
    torch.manual_seed(12)
    d_model, n_heads, d = 16, 2, 8
    rel_bias = RelativePositionBias(n_heads) if position == "t5" else None

    def layer(encoded: bool) -> Attention:
        mem = InfiniMemory(InfiniConfig(layers=[0]), n_heads=n_heads, head_dim=d,
                           d_model=d_model)
        rotary = Rotary(d) if encoded and position == "rope" else None
        return Attention(d_model, n_heads, d, xl_cache=True, memory=mem, rotary=rotary)

    plain, encoded = layer(False), layer(True)
    encoded.load_state_dict(plain.state_dict())
    x = torch.randn(2, 2, 6, d_model)  # (segment, B, L, D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    seen = {}
    for name, attn in (("plain", plain), ("encoded", encoded)):
        calls = []
        attn.memory.register_forward_hook(lambda m, args, out, calls=calls:
                                          calls.append((*args[:4], out)))
        bias = rel_bias if name == "encoded" else None
        for seg in x:
            attn(seg, mask, bias)
        seen[name] = calls
    g = torch.sigmoid(plain.memory.gate.detach())[None, :, None, None]  # (1, H, 1, 1)
    for s, ((q, k, v, local, out), (q2, k2, v2, local2, out2)) in enumerate(
            zip(seen["plain"], seen["encoded"])):
        assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)
        assert not torch.allclose(local, local2, atol=1e-4)  # positions matter there
        a_mem, a_mem2 = ((o - (1 - g) * lo) / g for o, lo in ((out, local), (out2, local2)))
        assert torch.allclose(a_mem, a_mem2, atol=1e-6)
        assert (a_mem.abs().max() > 0.1) == (s == 1)  # segment 2 retrieves segment 1
    assert torch.equal(plain.memory.M, encoded.memory.M)
    assert torch.equal(plain.memory.z, encoded.memory.z)


def tiny_lm(**kw) -> MemformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, head_dim=8, d_ff=64, vocab_size=50,
                      position="rope", **kw)
    return MemformerLM(cfg)


def test_model_three_segments_forward_backward_and_gate_group():
    model = tiny_lm(infini=InfiniConfig(layers=[0, 1]))
    tokens = torch.randint(0, 50, (2, 49))
    loss = 0.0
    for s in range(3):
        seg = tokens[:, s * 16:(s + 1) * 16 + 1]
        loss = loss + lm_loss(model(seg[:, :-1]), seg[:, 1:])
    loss.backward()
    gates = gate_group(model)
    assert len(gates) == 2 and all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)
    names = [n for n, p in model.named_parameters() if n.endswith("gate")]
    assert names == ["blocks.0.attn.memory.gate", "blocks.1.attn.memory.gate"]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    saved = collect_state_tensors(model)
    assert set(saved) == {f"blocks.{i}.attn.memory.{t}" for i in (0, 1) for t in "Mz"}
    other = tiny_lm(infini=InfiniConfig(layers=[0, 1]))
    other.load_state_dict(model.state_dict())
    other.allocate_state(2)
    load_collected_state_tensors(other, saved)
    nxt = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(nxt), other(nxt), atol=1e-6)


def test_model_bptt_reaches_tokens_of_previous_segment():
    """Loss of segment 2 only: embeddings of tokens seen only in segment 1 get gradient."""
    for detach in (False, True):
        model = tiny_lm(infini=InfiniConfig(layers=[0, 1]), tie_embeddings=False)
        seg1 = torch.randint(0, 25, (2, 16))
        seg2 = torch.randint(25, 50, (2, 17))
        model(seg1)
        if detach:
            model.detach_state()
        lm_loss(model(seg2[:, :-1]), seg2[:, 1:]).backward()
        g = model.embed.weight.grad[:25].abs().sum()
        assert (g == 0) if detach else (g > 0)


def test_learns_to_recall_a_token_from_the_previous_segment():
    """Segment 1 = [key, filler...]; segment 2 = [filler..., ask] -> predict the key.

    No XL cache, so only the compressive memory carries the key across segments.
    """
    torch.manual_seed(0)
    n_keys, seg_len, batch = 8, 8, 32
    filler, ask = n_keys, n_keys + 1
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=2, head_dim=16, d_ff=64,
                      vocab_size=n_keys + 2, position="rope",
                      infini=InfiniConfig(layers=[0], update="delta"))
    model = MemformerLM(cfg)
    gates = gate_group(model)
    others = [p for p in model.parameters() if all(p is not g for g in gates)]
    opt = torch.optim.Adam([{"params": others, "lr": 3e-3},
                            {"params": gates, "lr": cfg.infini.gate_lr}])

    def batch_of(n):
        keys = torch.randint(0, n_keys, (n,))
        s1 = torch.full((n, seg_len), filler)
        s1[:, 0] = keys
        s2 = torch.full((n, seg_len), filler)
        s2[:, -1] = ask
        return keys, s1, s2

    def predict(s1, s2, forget=False):
        model.allocate_state(s1.shape[0])
        model(s1)
        return model(s2, new_doc=torch.full((s1.shape[0],), forget))[:, -1]

    start = time.perf_counter()
    for _ in range(300):
        keys, s1, s2 = batch_of(batch)
        loss = torch.nn.functional.cross_entropy(predict(s1, s2), keys)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        keys, s1, s2 = batch_of(512)
        acc = (predict(s1, s2).argmax(-1) == keys).float().mean().item()
        acc_forgot = (predict(s1, s2, forget=True).argmax(-1) == keys).float().mean().item()
    print(f"recall accuracy {acc:.3f} (reset memory: {acc_forgot:.3f}, chance "
          f"{1 / n_keys:.3f}) in {time.perf_counter() - start:.1f}s")
    assert acc > 0.6  # seed 0 reaches 1.0 after ~175 steps; other seeds 0.89-1.0 at 300
    assert acc_forgot < 0.3  # the memory, not something else, carries the key


def test_trainer_gives_gates_their_own_group():
    from memformers.config import TrainConfig
    from memformers.train.optim import build_optimizers

    model = MemformerLM(ModelConfig(n_layers=2, d_model=32, n_heads=4, head_dim=8, d_ff=64,
                                    infini=InfiniConfig(layers=[1], gate_lr=0.05)))
    (opt,) = build_optimizers(model, TrainConfig(lr=1e-3, weight_decay=0.1))
    gate = model.blocks[1].attn.memory.gate
    groups = [g for g in opt.param_groups if any(p is gate for p in g["params"])]
    assert len(groups) == 1 and groups[0]["lr"] == 0.05 and groups[0]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) == 1


@pytest.mark.parametrize("bptt", [2, 3])
def test_trainer_bptt_window_is_the_truncation(bptt, tiny_corpus, tmp_path):
    """Six segments with disjoint token ranges, a loss on the last one only: through the
    compressive memory its gradient reaches the tokens of the earlier segments of its
    window and none before; and the trainer's gradients equal a hand-unrolled run."""
    cfg = load_config(None, [*TINY_MODEL, f"data.corpus=\"{tiny_corpus}\"",
                             "model.infini.layers=[0, 1]", "model.tie_embeddings=false",
                             f"train.bptt_segments={bptt}"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    ref = copy.deepcopy(trainer.model)
    n_seg, n_tok, span = 6, cfg.data.segment_len, 30  # segment i uses tokens [30 i, 30 i + 30)
    g = torch.Generator().manual_seed(13)
    batches = []
    for i in range(n_seg):
        tokens = torch.randint(span * i, span * (i + 1), (2, n_tok), generator=g)
        targets = tokens if i == n_seg - 1 else torch.full_like(tokens, -100)
        pos = torch.arange(n_tok * i, n_tok * (i + 1)).expand(2, n_tok)
        batches.append(Batch(tokens, targets, torch.ones_like(tokens, dtype=torch.bool),
                             torch.zeros(2, dtype=torch.bool), pos, torch.zeros(2).long()))
    trainer.task.stream = iter(batches)
    for _ in range(n_seg // bptt):
        trainer.train_window()

    rows = trainer.model.embed.weight.grad.abs().sum(1)  # (V,)
    reached = [bool(rows[span * i:span * (i + 1)].sum() > 0) for i in range(n_seg)]
    assert reached == [i >= n_seg - bptt for i in range(n_seg)]

    for i, b in enumerate(batches):  # the same by hand: detach after every bptt segments
        logits = ref(b.tokens, new_doc=b.new_doc, mask=b.mask)
        if (i + 1) % bptt == 0:
            ref.detach_state()
    (lm_loss(logits, b.targets, reduction="sum") / b.mask.sum()).backward()
    for (name, p), q in zip(trainer.model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name
