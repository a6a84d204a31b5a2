import pytest
import torch

from memformers.config import ModelConfig
from memformers.model import MemformerLM, lm_loss
from memformers.model.position import RelativePositionBias


def small(**kw) -> MemformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, head_dim=8, d_ff=64, vocab_size=50, **kw)
    model = MemformerLM(cfg)
    if model.rel_bias is not None:  # non-zero bias so positions matter in the tests
        torch.nn.init.normal_(model.rel_bias.emb.weight)
    return model.eval()


@pytest.mark.parametrize("position", ["t5", "rope", "none"])
def test_causal_future_tokens_never_change_earlier_logits(position):
    model = small(position=position)
    tokens = torch.randint(0, 50, (2, 24))
    changed = tokens.clone()
    changed[:, 13:] = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :13], b[:, :13], atol=1e-5)
    assert not torch.allclose(a[:, 13:], b[:, 13:], atol=1e-3)


@pytest.mark.parametrize("position", ["t5", "rope"])
def test_xl_two_segments_equal_one_causal_pass(position):
    """Segment 2 with the cache of segment 1 == full causal pass over both (window 2L)."""
    model = small(position=position, xl_cache=True)
    tokens = torch.randint(0, 50, (3, 32))
    with torch.no_grad():
        model.allocate_state(3)
        seg1 = model(tokens[:, :16])
        seg2 = model(tokens[:, 16:])
        model.allocate_state(3)
        full = model(tokens)
    assert torch.allclose(torch.cat([seg1, seg2], 1), full, atol=1e-5)


def test_xl_reset_clears_exactly_flagged_streams():
    model = small(xl_cache=True)
    tokens = torch.randint(0, 50, (2, 32))
    with torch.no_grad():
        model.allocate_state(2)
        model(tokens[:, :16])
        out = model(tokens[:, 16:], new_doc=torch.tensor([True, False]))
        model.allocate_state(2)
        fresh = model(tokens[:, 16:])  # no cache at all
        model.allocate_state(2)
        full = model(tokens)
    assert torch.allclose(out[0], fresh[0], atol=1e-5)  # stream 0 forgot segment 1
    assert torch.allclose(out[1], full[1, 16:], atol=1e-5)  # stream 1 kept it


def test_xl_padding_in_cache_is_never_attended():
    model = small(xl_cache=True)
    tokens = torch.randint(0, 50, (1, 32))
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[:, 10:] = False
    noisy = tokens.clone()
    noisy[:, 10:16] = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        outs = []
        for t in (tokens, noisy):
            model.allocate_state(1)
            model(t[:, :16], mask=mask)
            outs.append(model(t[:, 16:]))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_commit_false_leaves_state_untouched():
    model = small(xl_cache=True)
    tokens = torch.randint(0, 50, (1, 48))
    with torch.no_grad():
        model.allocate_state(1)
        model(tokens[:, :16])
        a = model(tokens[:, 16:32], commit=False)
        b = model(tokens[:, 16:32])
        c = model(tokens[:, 32:])
        model.allocate_state(1)
        model(tokens[:, :16])
        model(tokens[:, 16:32])
        d = model(tokens[:, 32:])
    assert torch.allclose(a, b) and torch.allclose(c, d)


def test_relative_bias_buckets_monotone_and_bounded():
    rb = RelativePositionBias(2, num_buckets=32, max_distance=128)
    b = rb.bucket(torch.arange(0, 1000))
    assert b[0] == 0 and b[15] == 15 and b.max() == 31
    assert bool((b[1:] >= b[:-1]).all())
    bias = rb(4, 300, torch.device("cpu"))  # (H, 4, 300): locality prior at init
    assert bias[0, -1, -1] == 0 and bias[0, -1, 0] == -0.25 * 31
    assert bool((bias[:, -1, 1:] >= bias[:, -1, :-1]).all())  # nearer keys never lower
    zero = RelativePositionBias(2, init_slope=0.0)
    assert bool((zero(4, 8, torch.device("cpu")) == 0).all())


def test_loss_ignores_padding_and_training_lowers_it():
    model = small().train()
    tokens = torch.randint(0, 50, (2, 17))
    targets = tokens[:, 1:].clone()
    targets[:, -3:] = -100
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = lm_loss(model(tokens[:, :-1]), targets)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("cache", [0, 7])
def test_causal_sdpa_in_query_blocks_equals_one_call(monkeypatch, cache):
    """CPU math path (a mask with a gradient): query blocks that skip the keys their rows
    cannot see give one call's output and gradients, with a cache holding invalid keys and
    a partial last block."""
    import torch.nn.functional as F

    from memformers.model import attention

    torch.manual_seed(0)
    B, H, L, d = 2, 3, 21, 8
    q = torch.randn(B, H, L, d, requires_grad=True)
    k = torch.randn(B, H, cache + L, d, requires_grad=True)
    v = torch.randn(B, H, cache + L, d, requires_grad=True)
    bias = torch.randn(1, H, L, cache + L, requires_grad=True)
    causal = torch.ones(L, cache + L, dtype=torch.bool).tril(diagonal=cache)
    key_ok = torch.ones(B, cache + L, dtype=torch.bool)
    key_ok[1, :2] = cache == 0  # stream 1: two invalid cache rows (a token sees itself)

    def run(fn):
        for t in (q, k, v, bias):
            t.grad = None
        mask = bias.masked_fill(~causal, float("-inf")).masked_fill(
            ~key_ok[:, None, None], float("-inf"))
        out = fn(mask)
        out.square().sum().backward()
        return [out.detach()] + [t.grad.clone() for t in (q, k, v, bias)]

    want = run(lambda mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention, "CAUSAL_BLOCK", 4)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(a[0].shape[2]) or real(*a, **kw))
    got = run(lambda mask: attention.causal_sdpa(q, k, v, mask, None, 0.0))
    assert calls == [4, 4, 4, 4, 4, 1]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_model_trains_the_same_with_causal_blocks(monkeypatch):
    """Two XL segments, forward and backward: every gradient equal with query blocks of 4
    rows and with one SDPA call per layer."""
    from memformers.model import attention

    def grads(block):
        monkeypatch.setattr(attention, "CAUSAL_BLOCK", block)
        model = small(position="t5", xl_cache=True).train()
        model.allocate_state(2)
        tokens = torch.randint(0, 50, (2, 33), generator=torch.Generator().manual_seed(1))
        loss = 0
        for seg in (tokens[:, :17], tokens[:, 16:]):
            loss = loss + lm_loss(model(seg[:, :-1]), seg[:, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_a, a = grads(4)
    loss_b, b = grads(10**6)
    torch.testing.assert_close(loss_a, loss_b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)
