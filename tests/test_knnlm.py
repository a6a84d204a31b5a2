"""The kNN-LM head (memory/knnlm.py) against a brute-force reference."""

import math

import pytest
import torch

from memformers.config import ModelConfig
from memformers.memory.configs import KNNLMConfig
from memformers.memory.knnlm import KNNLM, masked_topk
from memformers.memory.state import collect_state_tensors, load_collected_state_tensors
from memformers.model import MemformerLM

D, V = 8, 11


def reference(h, tokens, cfg: KNNLMConfig, logits, seg: int = 1 << 30):
    """Full scan over each stream's whole past, mixture in probability space.

    h (T, D), tokens (T,), logits (T, V) of ONE stream over one document, fed ``seg``
    tokens at a time -> log p (T, V). Position t of the segment starting at S sees the
    pairs (h_p, x_{p+1}) with p <= t - 1 - min_distance among: the last ``capacity`` pairs
    stored before the segment (p <= S - 2; FIFO) and the pairs known inside it."""
    T = len(tokens)
    key = torch.nn.functional.normalize(h, dim=-1) if cfg.similarity == "cosine" else h
    p_lm = torch.softmax(logits.double(), -1)
    out = torch.empty(T, V, dtype=torch.float64)
    for t in range(T):
        known = t - 1 - cfg.min_distance  # last usable key position
        start = t - t % seg
        lo = max(0, start - 1 - cfg.capacity)  # the ring holds pairs start-1-C .. start-2
        ps = list(range(lo, known + 1))
        if not ps:
            out[t] = p_lm[t].log()
            continue
        if cfg.similarity == "cosine":
            s = torch.stack([key[t].double() @ key[p].double() for p in ps])
        else:
            s = torch.stack([-(key[t].double() - key[p].double()).pow(2).sum() for p in ps])
        top = s.topk(min(cfg.top_k, len(ps)))
        w = torch.softmax(top.values / cfg.temperature, 0)
        p_knn = torch.zeros(V, dtype=torch.float64)
        for wi, j in zip(w, top.indices.tolist()):
            p_knn[tokens[ps[j] + 1]] += wi
        out[t] = ((1 - cfg.lam) * p_lm[t] + cfg.lam * p_knn).log()
    return out


def run_head(head, h, tokens, logits, seg):
    """Feed one stream per row segment by segment; -> log p (B, T, V)."""
    B, T = tokens.shape
    head.allocate(B, "cpu")
    outs = []
    for s in range(0, T, seg):
        mask = torch.ones(B, min(seg, T - s), dtype=torch.bool)
        outs.append(head(logits[:, s:s + seg], h[:, s:s + seg], tokens[:, s:s + seg], mask,
                         True))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("cfg", [
    KNNLMConfig(capacity=1000, top_k=4, temperature=0.1, lam=0.3),
    KNNLMConfig(capacity=9, top_k=3, temperature=0.5, lam=0.5, min_distance=5),
    KNNLMConfig(capacity=1000, top_k=50, temperature=2.0, lam=0.25, similarity="l2",
                storage_dtype="float32"),
    KNNLMConfig(capacity=20, top_k=6, lam=0.4, min_distance=13, search_chunk=7,
                storage_dtype="float32"),
    # faiss IVF probing every list is exact; trained after 16 keys, exact before
    KNNLMConfig(capacity=25, top_k=5, lam=0.3, backend="ivf", ivf_nlist=4, ivf_nprobe=4,
                ivf_train=16, storage_dtype="float32"),
    KNNLMConfig(capacity=12, top_k=4, lam=0.3, min_distance=3, similarity="l2",
                backend="ivf", ivf_nlist=2, ivf_nprobe=2, ivf_train=8,
                storage_dtype="float32"),
    # product codes short-list every stored pair, rescored exactly from the ring: exact
    # (fp32 ring: faiss's by-index kernel; fp16 ring: torch)
    KNNLMConfig(capacity=25, top_k=5, lam=0.3, backend="ivf", ivf_nlist=4, ivf_nprobe=4,
                ivf_train=16, ivf_codes="pq4", ivf_rescore=64, storage_dtype="float32"),
    KNNLMConfig(capacity=12, top_k=4, lam=0.3, min_distance=3, similarity="l2",
                backend="ivf", ivf_nlist=2, ivf_nprobe=2, ivf_train=16, ivf_codes="pq4",
                ivf_rescore=64),
])
@pytest.mark.parametrize("seg", [1, 6, 64])
def test_head_equals_brute_force(cfg, seg):
    torch.manual_seed(0)
    B, T = 2, 40
    h = torch.randn(B, T, D)
    tokens = torch.randint(0, V, (B, T))
    logits = torch.randn(B, T, V)
    got = run_head(KNNLM(cfg, D), h, tokens, logits, seg)
    tol = 2e-2 if cfg.storage_dtype == "float16" else 1e-5
    for b in range(B):
        ref = reference(h[b], tokens[b], cfg, logits[b], seg)
        assert torch.allclose(got[b].double().exp(), ref.exp(), atol=tol), (b, seg)
        assert torch.allclose(got[b].exp().sum(-1), torch.ones(T), atol=1e-5)


@pytest.mark.parametrize("similarity", ["cosine", "l2"])
def test_ivf_with_fp16_codes_of_fp16_keys_equals_exact_search(similarity):
    """ivf_codes "auto" copies the ring's fp16 keys as fp16 codes, losslessly: probing
    every list gives the exact backend's log-probabilities (same storage)."""
    torch.manual_seed(1)
    B, T = 2, 60
    h, tokens, logits = torch.randn(B, T, D), torch.randint(0, V, (B, T)), torch.randn(B, T, V)
    common = dict(capacity=30, top_k=5, lam=0.4, temperature=0.2, similarity=similarity)
    exact = run_head(KNNLM(KNNLMConfig(backend="exact", **common), D), h, tokens, logits, 7)
    head = KNNLM(KNNLMConfig(backend="ivf", ivf_nlist=4, ivf_nprobe=4, ivf_train=16, **common),
                 D)
    ivf = run_head(head, h, tokens, logits, 7)
    assert head.ivf.ready and head.ivf.codes == "fp16"
    assert torch.allclose(ivf, exact, atol=1e-5)


@pytest.mark.parametrize("backend", ["exact", "ivf"])
def test_adaptive_retrieval_searches_only_where_the_model_is_unsure(backend):
    """retrieve_below t: a position whose largest p_LM is >= t keeps p_LM exactly; every
    other position gets the brute-force reference's mixture (still over every stored
    pair, confident positions' included)."""
    torch.manual_seed(2)
    B, T, seg = 2, 48, 8
    h, tokens = torch.randn(B, T, D), torch.randint(0, V, (B, T))
    logits = torch.randn(B, T, V) * 3  # a spread of confidences
    common = dict(capacity=1000, top_k=4, temperature=0.3, lam=0.4, storage_dtype="float32",
                  backend=backend, ivf_nlist=4, ivf_nprobe=4, ivf_train=16)
    p_max = torch.softmax(logits, -1).max(-1).values
    v = p_max.flatten().sort().values
    t = float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2  # halfway: no position on the edge
    got = run_head(KNNLM(KNNLMConfig(retrieve_below=t, **common), D), h, tokens, logits, seg)
    sure = p_max >= t
    assert 0 < int(sure.sum()) < B * T
    assert torch.equal(got[sure], torch.log_softmax(logits, -1)[sure])
    for b in range(B):
        ref = reference(h[b], tokens[b], KNNLMConfig(**common), logits[b], seg)
        unsure = ~sure[b]
        assert torch.allclose(got[b][unsure].double(), ref[unsure], atol=1e-5)


def test_never_retrieves_itself_or_later_positions():
    """Each position's key is a one-hot of its own index: any retrieval of itself or of a
    later position would show as a neighbour with similarity 1."""
    T = 30
    h = torch.eye(T)[None]  # (1, T, T): orthogonal keys
    h[:, :, 0] += 1e-3  # no zero vectors
    tokens = torch.arange(T)[None] % V
    cfg = KNNLMConfig(capacity=100, top_k=T, storage_dtype="float32")
    head = KNNLM(cfg, T)
    head.allocate(1, "cpu")
    for s in range(0, T, 7):
        sim, vals = head.neighbours(h[:, s:s + 7], tokens[:, s:s + 7],
                                    torch.ones(1, min(7, T - s), dtype=torch.bool))
        for j in range(sim.shape[1]):
            t = s + j
            assert int(torch.isfinite(sim[0, j]).sum()) == t  # exactly the t earlier pairs
            assert bool((sim[0, j][torch.isfinite(sim[0, j])] < 0.5).all())
        head.write(h[:, s:s + 7], tokens[:, s:s + 7], torch.ones(1, min(7, T - s),
                                                                  dtype=torch.bool))


def model_cfg(**knnlm) -> ModelConfig:
    return ModelConfig(vocab_size=V, n_layers=2, d_model=16, n_heads=2, head_dim=8, d_ff=32,
                       xl_cache=True, knnlm=KNNLMConfig(**knnlm))


def test_lambda_zero_is_the_base_model_bit_for_bit():
    torch.manual_seed(0)
    base = MemformerLM(model_cfg()).eval()
    with_head = MemformerLM(model_cfg(capacity=64, lam=0.0)).eval()
    with_head.load_state_dict(base.state_dict())  # the head has no parameters
    tokens = torch.randint(0, V, (2, 30))
    for s in range(0, 30, 10):
        new = torch.full((2,), s == 0)
        assert torch.equal(base(tokens[:, s:s + 10], new_doc=new),
                           with_head(tokens[:, s:s + 10], new_doc=new))
    assert int(with_head.knnlm.count.min()) == 29  # it still stores the pairs


def test_model_uses_chosen_hidden_state_and_scores_log_mixture():
    torch.manual_seed(0)
    m = MemformerLM(model_cfg(capacity=64, lam=0.5, key="ffn_input",
                              storage_dtype="float32")).eval()
    tokens = torch.randint(0, V, (1, 12))
    out = m(tokens, new_doc=torch.ones(1, dtype=torch.bool))
    assert torch.allclose(out.exp().sum(-1), torch.ones(1, 12), atol=1e-5)  # log-probs
    # by hand: the last FFN's normalised input as keys, the mixture of probabilities
    m.allocate_state(1)
    ffn_in = {}
    m.blocks[-1].norm2.register_forward_hook(lambda mod, i, o: ffn_in.setdefault("h", o))
    m.knnlm.cfg.lam = 1e-12  # ~ the base logits, and records the keys
    base_logp = m(tokens, new_doc=torch.ones(1, dtype=torch.bool))
    ref = reference(ffn_in["h"][0], tokens[0], m.knnlm.cfg.__class__(
        capacity=64, lam=0.5, storage_dtype="float32"), base_logp[0])
    assert torch.allclose(out[0].double().exp(), ref.exp(), atol=1e-5)


def test_stream_reset_and_save_load_are_exact():
    torch.manual_seed(0)
    cfg = model_cfg(capacity=16, lam=0.3, storage_dtype="float32")
    m = MemformerLM(cfg).eval()
    docs = torch.randint(0, V, (2, 40))
    new = torch.tensor([True, True])
    m(docs[:, :20], new_doc=new)
    saved = collect_state_tensors(m)
    # stream 1 starts a new document: equals a fresh model's first segment on that row
    after = m(docs[:, 20:30], new_doc=torch.tensor([False, True]))
    fresh = MemformerLM(cfg).eval()
    fresh.load_state_dict(m.state_dict())
    ref = fresh(docs[:, 20:30], new_doc=new)
    # (to rounding: the reset row still attends over its masked-out XL cache, which moves
    # SDPA's summation order; 2e-7 seen)
    assert torch.allclose(after[1], ref[1], atol=1e-5, rtol=0)
    assert not torch.allclose(after[0], ref[0], atol=1e-3)
    # a model loaded with the saved state continues stream 0 exactly
    other = MemformerLM(cfg).eval()
    other.load_state_dict(m.state_dict())
    other.allocate_state(2)
    load_collected_state_tensors(other, saved)
    assert torch.equal(other(docs[:, 20:30], new_doc=torch.tensor([False, True]))[0], after[0])


def test_fifo_keeps_exactly_the_last_capacity_pairs():
    cfg = KNNLMConfig(capacity=5, top_k=5, storage_dtype="float32")
    head = KNNLM(cfg, D)
    head.allocate(1, "cpu")
    h, tokens = torch.randn(1, 23, D), torch.randint(0, V, (1, 23))
    for s in range(0, 23, 4):
        head.write(h[:, s:s + 4], tokens[:, s:s + 4], torch.ones(1, min(4, 23 - s),
                                                                   dtype=torch.bool))
    assert int(head.count) == 22 and bool(head.pending)  # pairs 0..21; 22 awaits x_23
    assert sorted(head.pos[0].tolist()) == [17, 18, 19, 20, 21]
    for slot, p in enumerate(head.pos[0].tolist()):
        assert int(head.values[0, slot]) == int(tokens[0, p + 1])
        assert torch.allclose(head.keys[0, slot], torch.nn.functional.normalize(h[0, p], dim=0))


def test_masked_topk_equals_sort():
    torch.manual_seed(3)
    q, keys = torch.randn(2, 5, D), torch.randn(2, 30, D)
    valid = torch.rand(2, 30) > 0.3
    pos = torch.randint(0, 20, (2, 30))
    limit = torch.randint(0, 20, (2, 5))
    s, i = masked_topk(q, keys, None, valid, pos, limit, 4, chunk=7)
    full = torch.einsum("bld,bnd->bln", q, keys)
    ok = valid[:, None] & (pos[:, None] <= limit[..., None])
    ref = full.masked_fill(~ok, -math.inf).sort(-1, descending=True).values[..., :4]
    assert torch.allclose(s, ref)
    real = torch.isfinite(s)
    assert bool((i[~real] == -1).all())
    assert torch.allclose(full.gather(2, i.clamp(min=0))[real], s[real])  # indices match
    for k in (4, 12):  # unsorted: the same pairs in some order (k = 12: fewer allowed)
        s1, i1 = masked_topk(q, keys, None, valid, pos, limit, k, chunk=7)
        s2, i2 = masked_topk(q, keys, None, valid, pos, limit, k, chunk=7, sorted=False)
        order = s2.sort(-1, descending=True)
        assert torch.equal(order.values, s1) and torch.equal(i2.gather(2, order.indices)
                                                             [torch.isfinite(s1)],
                                                             i1[torch.isfinite(s1)])


def test_ivf_recall_on_clustered_keys_and_reset():
    """Few lists probed: still finds most true neighbours of keys that cluster (as hidden
    states do); a stream reset empties its index only."""
    torch.manual_seed(0)
    D2, T = 16, 600
    centres = torch.randn(20, D2)
    h = (centres[torch.randint(0, 20, (2, T))] + 0.3 * torch.randn(2, T, D2))
    tokens = torch.randint(0, V, (2, T))
    mask = torch.ones(2, 100, dtype=torch.bool)
    exact = KNNLM(KNNLMConfig(capacity=1000, top_k=8, storage_dtype="float32",
                              backend="exact"), D2)
    ivf = KNNLM(KNNLMConfig(capacity=1000, top_k=8, storage_dtype="float32", backend="ivf",
                            ivf_nlist=16, ivf_nprobe=4, ivf_train=256), D2)
    for m in (exact, ivf):
        m.allocate(2, "cpu")
        for s in range(0, T - 100, 100):
            m.write(h[:, s:s + 100], tokens[:, s:s + 100], mask)
    assert ivf.ivf.ready and ivf.ivf.indexes[0].ntotal == int(ivf.count[0]) == 499
    q = h[:, T - 100:]
    se, _ = exact.neighbours(q, tokens[:, T - 100:], mask)
    si, _ = ivf.neighbours(q, tokens[:, T - 100:], mask)
    assert bool((si <= se.amax(-1, keepdim=True) + 1e-5).all())
    recall = (si[..., :, None] - se[..., None, :]).abs().lt(1e-5).any(-1).float().mean()
    assert recall > 0.8
    ivf.reset(torch.tensor([True, False]))
    assert ivf.ivf.indexes[0].ntotal == 0 and ivf.ivf.indexes[1].ntotal == 499


def test_generate_with_the_knnlm_equals_full_forwards():
    """Greedy decoding (state kept across steps, pending pairs resolved by the next
    segment) equals re-feeding the whole text from scratch at every step: a position's
    pair is usable once its next token is known, committed or not."""
    from memformers.evaluate.generate import feed_and_generate

    torch.manual_seed(1)
    cfg = model_cfg(capacity=64, lam=0.6, temperature=0.05, storage_dtype="float32")
    cfg.xl_cache = False
    m = MemformerLM(cfg).eval()
    prompt = torch.randint(0, V, (1, 13))
    got = feed_and_generate(m, prompt, 9, segment_len=5)
    # reference: step t re-feeds the whole text from a fresh state, committing only full
    # segments, and takes the argmax at the end
    full = torch.cat([prompt, got], 1)
    ref = []
    with torch.no_grad():
        for t in range(13, 22):
            m.allocate_state(1)
            out = None
            for s in range(0, t, 5):
                out = m(full[:, s:min(s + 5, t)], new_doc=torch.tensor([s == 0]),
                        commit=s + 5 <= t)
            ref.append(int(out[0, -1].argmax()))
    assert got[0].tolist() == ref


def test_tune_scores_the_grid_exactly():
    from memformers.evaluate.knnlm_tune import mixture_loss, tune

    log_lm = torch.log(torch.tensor([0.5, 0.25, 0.1]))
    sim = torch.tensor([[0.9, 0.1], [0.5, -math.inf], [-math.inf, -math.inf]])
    hit = torch.tensor([[True, False], [False, False], [False, False]])
    log_max = torch.log(torch.tensor([0.6, 0.9, 0.3]))  # the largest p_LM of each position
    rec = {"log_lm": log_lm, "log_max": log_max, "sim": sim, "hit": hit}
    w = torch.softmax(torch.tensor([0.9, 0.1]) / 0.5, 0)[0]
    expect = -(math.log(0.8 * 0.5 + 0.2 * w) + math.log(0.8 * 0.25) + math.log(0.1)) / 3
    assert abs(mixture_loss(rec, 0.2, 0.5) - expect) < 1e-6
    # retrieve_below 0.8: token 1 (max p 0.9) keeps p_LM
    skip = -(math.log(0.8 * 0.5 + 0.2 * w) + math.log(0.25) + math.log(0.1)) / 3
    assert abs(mixture_loss(rec, 0.2, 0.5, 0.8) - skip) < 1e-6
    r = tune(rec, lambdas=(0.0, 0.2), temperatures=(0.5,), thresholds=(1.0, 0.8, 0.5))
    assert r["best"]["lam"] == 0.0  # the kNN hurts token 2 more than it helps token 1
    assert abs(r["base_loss"] - float(-log_lm.double().mean())) < 1e-9
    assert [a["searched"] for a in r["adaptive"]] == [1.0, 2 / 3, 1 / 3]


def test_pq4_codes_written_by_the_head_rank_the_true_neighbours():
    """The head's own path (one coarse-quantizer run shared by a segment's search and its
    add) with a short-list of only top_k: a text that repeats itself twice has two
    near-duplicates of each later state, and the product codes short-list both (codes
    written wrongly would rank at random: 8 of 600 pairs)."""
    torch.manual_seed(3)
    D2, seg, k = 64, 50, 8
    base = torch.nn.functional.normalize(torch.randn(300, D2), dim=-1)
    noisy = lambda x: x + 0.05 * torch.randn_like(x) / D2 ** 0.5  # noqa: E731
    h = torch.cat([base, noisy(base), noisy(base[:50])])[None]  # (1, 650, D2)
    T = h.shape[1]
    tokens, logits = torch.randint(0, V, (1, T)), torch.randn(1, T, V)
    common = dict(capacity=1000, top_k=k, lam=0.3, storage_dtype="float32")
    heads = [KNNLM(KNNLMConfig(backend="exact", **common), D2),
             KNNLM(KNNLMConfig(backend="ivf", ivf_nlist=8, ivf_nprobe=8, ivf_train=128,
                               ivf_codes="pq4", **common), D2)]
    sims = []
    for head in heads:
        run_head(head, h[:, :600], tokens[:, :600], logits[:, :600], seg)
        mask = torch.ones(1, T - 600, dtype=torch.bool)
        sims.append(head.neighbours(h[:, 600:], tokens[:, 600:], mask)[0][0])  # (50, k)
    assert heads[1].ivf.ready
    exact, pq = sims
    assert (exact[:, 1] > 0.9).all()  # the two near-duplicates
    # exact scores: a neighbour found has exact search's similarity
    found = (pq[:, :, None] - exact[:, None, :2]).abs().lt(1e-5).any(1).float().mean()
    assert found > 0.95, found
