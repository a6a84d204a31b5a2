import math

import pytest
import torch
import torch.nn.functional as F

from memformers.config import ModelConfig, TrainConfig
from memformers.diagnostics.pkm_bn import batch_statistics, per_batch_statistics
from memformers.memory.configs import PKMConfig
from memformers.memory.pkm import (
    MaskedBatchNorm1d,
    ProductKeyMemory,
    pkm_usage_report,
    product_topk,
    resolve_sparse,
    track_pkm_usage,
    usage_stats,
)
from memformers.model import MemformerLM, lm_loss
from memformers.train.distributed import separately_sharded
from memformers.train.optim import build_optimizers, set_lr


def brute_topk(q, keys, k):
    """Top-k over all n^2 full keys [c1_i; c2_j], slot = i * n + j."""
    H, _, n, h = keys.shape
    full = torch.cat([keys[:, 0, :, None, :].expand(H, n, n, h),
                      keys[:, 1, None, :, :].expand(H, n, n, h)], -1).reshape(H, n * n, 2 * h)
    scores = torch.einsum("thd,hnd->thn", q, full)  # (T, H, n^2)
    return scores, scores.topk(k, dim=-1)


def full_score(q, keys, slots):
    n = keys.shape[2]
    i, j = slots // n, slots % n
    H = keys.shape[0]
    hh = torch.arange(H)[None, :, None]
    k1, k2 = keys[hh, 0, i], keys[hh, 1, j]  # (T, H, k, h)
    h = keys.shape[-1]
    return (q[..., None, :h] * k1).sum(-1) + (q[..., None, h:] * k2).sum(-1)


@pytest.mark.parametrize("n,k", [(16, 4), (32, 8), (20, 20)])
def test_product_topk_equals_brute_force(n, k):
    torch.manual_seed(n + k)
    T, H, h = 40, 3, 4
    q = torch.randn(T, H, 2 * h, dtype=torch.float64)
    keys = torch.randn(H, 2, n, h, dtype=torch.float64)
    scores, slots = product_topk(q, keys, k)
    _, (bs, bi) = brute_topk(q, keys, k)
    assert torch.equal(slots, bi)
    assert torch.allclose(scores, bs)


def test_product_topk_with_ties_across_halves():
    """Integer sub-keys: many (i, j) pairs tie (s1[a] + s2[b] == s1[a'] + s2[b'])."""
    torch.manual_seed(0)
    T, H, n, h, k = 30, 2, 16, 2, 6
    keys = torch.randint(-2, 3, (H, 2, n, h)).double()
    q = torch.randint(-2, 3, (T, H, 2 * h)).double()
    # exact duplicates inside a half too: the k-th sub-key ties with the (k+1)-th
    keys[:, :, 8:] = keys[:, :, :8]
    scores, slots = product_topk(q, keys, k)
    all_scores, (bs, _) = brute_topk(q, keys, k)
    assert torch.equal(scores, bs)  # same top-k score multiset (sorted)
    # every returned slot really has the returned score, and slots are distinct
    assert torch.equal(full_score(q, keys, slots), scores)
    assert torch.equal(all_scores.gather(-1, slots), scores)
    assert all(len(set(r.tolist())) == k for r in slots.reshape(-1, k))
    ties = (all_scores >= bs[..., -1:]).sum(-1) > k  # rows whose k-th score is tied
    assert ties.any()


def small_pkm(**kw) -> ProductKeyMemory:
    torch.manual_seed(0)
    cfg = PKMConfig(layers=[0], n_keys=16, k_dim=8, heads=2, top_k=4, **kw)
    return ProductKeyMemory(cfg, d_model=12, shared_modules={})


def test_gradients_reach_keys_query_and_only_selected_values():
    pkm = small_pkm(query_norm="layernorm")
    x = torch.randn(2, 5, 12)
    out = pkm(x)
    assert out.shape == (2, 5, 12)
    (out * torch.randn_like(out)).sum().backward()
    for p in (pkm.keys, pkm.query.weight, pkm.query.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    with torch.no_grad():
        _, slots = pkm.lookup(x.view(10, 12))
    touched = pkm.values.weight.grad.abs().sum(1).nonzero().flatten()
    assert torch.equal(touched, slots.unique())


def test_subkey_gradients_match_autograd_through_full_scores():
    torch.manual_seed(1)
    q = torch.randn(7, 2, 6, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 2, 10, 3, dtype=torch.float64, requires_grad=True)
    scores, slots = product_topk(q, keys, 5)
    g = torch.randn_like(scores)
    ga = torch.autograd.grad((scores * g).sum(), (q, keys))
    gb = torch.autograd.grad((full_score(q, keys, slots) * g).sum(), (q, keys))
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b)


def test_sparse_and_dense_values_same_forward_and_sgd_update():
    x = torch.randn(3, 6, 12)
    outs, weights = [], []
    for sparse in (False, True):
        pkm = small_pkm(sparse=sparse)
        assert pkm.values.sparse is sparse
        opt = torch.optim.SGD(pkm.parameters(), lr=0.5)
        out = pkm(x)
        out.square().sum().backward()
        assert pkm.values.weight.grad.is_sparse is sparse
        opt.step()
        outs.append(out.detach())
        weights.append({k: v.clone() for k, v in pkm.state_dict().items()})
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    for k in weights[0]:
        assert torch.allclose(weights[0][k].float(), weights[1][k].float(), atol=1e-6), k


def test_sparse_adam_and_adam_make_the_same_first_value_update():
    """The real optimiser pair: SparseAdam on sparse gradients and Adam (no decay) on
    dense ones give every value row the same first step, untouched rows unchanged."""
    x = torch.randn(3, 6, 12)
    tables = []
    for sparse in (False, True):
        pkm = small_pkm(sparse=sparse)
        before = pkm.values.weight.detach().clone()
        opts = build_optimizers(pkm, TrainConfig(lr=1e-3, weight_decay=0.1))
        (pkm(x) * torch.linspace(-1, 1, 12)).sum().backward()
        for opt in opts:
            opt.step()
        tables.append(pkm.values.weight.detach())
    assert torch.allclose(tables[0], tables[1], atol=1e-7)
    moved = (tables[0] - before).abs().sum(1) > 0
    assert 0 < moved.sum() < len(moved)


def test_sparse_auto_is_sparse_on_cpu_dense_on_cuda_and_for_fsdp():
    auto = PKMConfig()
    assert auto.sparse == "auto" and small_pkm().values.sparse is False  # unresolved: dense
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_sparse(auto, cpu, TrainConfig()).sparse is True
    assert resolve_sparse(auto, cuda, TrainConfig()).sparse is False
    assert resolve_sparse(auto, cpu, TrainConfig(parallel="fsdp")).sparse is False
    assert resolve_sparse(auto, cpu, TrainConfig(shard_pkm_values=True)).sparse is False
    for fixed in (True, False):
        assert resolve_sparse(PKMConfig(sparse=fixed), cuda, TrainConfig()).sparse is fixed


def test_value_optimizer_kinds_and_param_groups():
    for sparse, kind in ((False, torch.optim.AdamW), (True, torch.optim.SparseAdam)):
        pkm = small_pkm(sparse=sparse)
        opts = build_optimizers(pkm, TrainConfig(lr=1e-3, weight_decay=0.1))
        opt = opts[-1]
        (group,) = [g for g in opt.param_groups if any(p is pkm.values.weight
                                                       for p in g["params"])]
        assert type(opt) is kind and group["lr"] == pkm.cfg.value_lr
        assert len(group["params"]) == 1 and group["params"][0] is pkm.values.weight
        assert group.get("weight_decay", 0) == 0
        assert sum(len(g["params"]) for o in opts for g in o.param_groups) == \
            len(list(pkm.parameters()))
        set_lr(opts, 50, TrainConfig(steps=100, warmup_steps=10))
        assert group["lr"] == pkm.cfg.value_lr  # constant, never scheduled
        pkm(torch.randn(2, 3, 12)).sum().backward()
        before = pkm.values.weight.detach().clone()
        opt.step()
        changed = (pkm.values.weight - before).abs().sum(1) > 0
        assert 0 < changed.sum() < pkm.n_slots  # only the rows that were read


def test_shared_values_one_parameter_counted_once():
    cfg = ModelConfig(n_layers=3, d_model=16, n_heads=2, head_dim=8, d_ff=32, vocab_size=20,
                      pkm=PKMConfig(layers=[0, 2], n_keys=8, k_dim=8, heads=2, top_k=2,
                                    share_values=True))
    model = MemformerLM(cfg)
    a, b = model.blocks[0].ffn, model.blocks[2].ffn
    assert a.values.weight is b.values.weight
    assert a.keys is not b.keys
    assert len(separately_sharded(model)) == 1
    unshared = MemformerLM(ModelConfig(**{**cfg.__dict__, "pkm": PKMConfig(
        layers=[0, 2], n_keys=8, k_dim=8, heads=2, top_k=2)}))
    assert len(separately_sharded(unshared)) == 2
    assert unshared.num_parameters() - model.num_parameters() == 64 * 16


def test_memory_plus_output():
    pkm = small_pkm(memory_plus=True, query_norm="none")
    x = torch.randn(2, 4, 12)
    w, slots = pkm.lookup(x.view(8, 12))
    read = (w[..., None] * pkm.values.weight[slots]).sum((1, 2))  # (8, D)
    expect = pkm.down(read * torch.nn.functional.silu(pkm.gate(x.view(8, 12))))
    assert torch.allclose(pkm(x).view(8, 12), expect, atol=1e-6)


def test_plain_output_is_weighted_sum_of_selected_values():
    pkm = small_pkm().eval()
    x = torch.randn(2, 4, 12)
    w, slots = pkm.lookup(x.view(8, 12))
    assert torch.allclose(w.sum(-1), torch.ones(8, 2))
    read = (w[..., None] * pkm.values.weight[slots]).sum((1, 2))
    assert torch.allclose(pkm(x).view(8, 12), read, atol=1e-6)


def test_masked_batchnorm_ignores_padding():
    pkm = small_pkm()  # batchnorm query norm, train mode
    x = torch.randn(2, 6, 12)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 1:] = False
    y = x.clone()
    y[~mask] = 100 * torch.randn(int((~mask).sum()), 12)
    a, b = pkm(x, mask), pkm(y, mask)
    assert torch.allclose(a[mask], b[mask], atol=1e-5)
    bn = MaskedBatchNorm1d(5, momentum=None)  # cumulative average: one batch = its stats
    z = torch.randn(9, 5)
    m = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    out = bn(z, m)
    real = z[m]
    assert torch.allclose(bn.running_mean, real.mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, real.var(0), atol=1e-5)
    ref = torch.nn.functional.batch_norm(real, None, None, training=True)
    assert torch.allclose(out[m], ref, atol=1e-5)
    bn.eval()
    assert torch.allclose(bn(z, m), (z - real.mean(0)) / (real.var(0) + bn.eps).sqrt(),
                          atol=1e-5)


def test_usage_stats_hand_made():
    c = torch.zeros(100)
    c[:4] = torch.tensor([50.0, 40.0, 9.0, 1.0])
    s = usage_stats(c)
    assert s["used"] == 0.04
    assert (s["slots_50"], s["slots_90"], s["slots_99"]) == (1, 2, 3)
    p = torch.tensor([0.5, 0.4, 0.09, 0.01], dtype=torch.float64)
    assert math.isclose(s["kl_uniform"], float((p * (p * 100).log()).sum()), rel_tol=1e-9)
    u = usage_stats(torch.ones(64))
    assert u["used"] == 1 and abs(u["kl_uniform"]) < 1e-12
    assert (u["slots_50"], u["slots_90"], u["slots_99"]) == (32, 58, 64)


def test_usage_tracking_counts_real_tokens_only():
    pkm = small_pkm().eval()
    x = torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pkm(x, mask)  # not tracked
    with track_pkm_usage(pkm):
        pkm(x, mask)
        pkm(x, mask)
    pkm(x, mask)  # not tracked
    w, slots = pkm.lookup(x.view(10, 12)[mask.view(-1)])
    expect = torch.zeros(pkm.n_slots, dtype=torch.float64)
    expect.index_add_(0, slots.flatten(), 2 * w.double().flatten())
    assert torch.allclose(pkm.usage.counts, expect)
    rep = pkm_usage_report(pkm)[""]
    assert rep["tokens"] == 16
    assert rep == {**usage_stats(expect), "tokens": 16}


def test_pkm_in_memformer_lm_trains():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, head_dim=8, d_ff=64, vocab_size=30,
                      pkm=PKMConfig(layers=[1], n_keys=16, k_dim=16, heads=2, top_k=4))
    model = MemformerLM(cfg)
    assert isinstance(model.blocks[1].ffn, ProductKeyMemory)
    opts = build_optimizers(model, TrainConfig(lr=3e-3, weight_decay=0.0))
    tokens = torch.randint(0, 30, (4, 17))
    losses = []
    for _ in range(15):
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    model.eval()
    with track_pkm_usage(model), torch.no_grad():
        model(tokens)
    rep = pkm_usage_report(model)
    assert set(rep) == {"blocks.1.ffn"} and 0 < rep["blocks.1.ffn"]["used"] <= 1


def test_masked_batchnorm_without_padding_matches_batchnorm1d():
    torch.manual_seed(3)
    z = torch.randn(10, 4)
    ref, bn = torch.nn.BatchNorm1d(4), MaskedBatchNorm1d(4)
    for mask in (torch.ones(10, dtype=torch.bool), None):
        assert torch.allclose(bn(z, mask), ref(z), atol=1e-6)
    assert torch.allclose(bn.running_mean, ref.running_mean)
    assert torch.allclose(bn.running_var, ref.running_var)
    # the masked path on the same all-real batch gives the same numbers
    man = MaskedBatchNorm1d(4)
    zz = torch.cat([z, torch.zeros(1, 4)])
    out = man(zz, torch.cat([torch.ones(10, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)]))
    assert torch.allclose(out[:10], ref(z), atol=1e-5)


def test_padded_segment_after_a_full_one_backpropagates_through_both():
    """BPTT window: the native kernel of segment 1 saves the running statistics, which
    the masked update of a padded segment 2 then changes (autograd version check)."""
    bn = MaskedBatchNorm1d(4)
    z1, z2 = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    mask = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    (bn(z1, None).square().sum() + bn(z2, mask).square().sum()).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad[mask].abs().sum() > 0
    assert int(bn.num_batches_tracked) == 2


def test_bn_stats_script_normalises_with_real_tokens_only():
    """diagnostics/pkm_bn.py's per-batch statistics: BatchNorm1d's training-mode output
    on the real rows, whatever the padded rows hold."""
    bn = MaskedBatchNorm1d(6).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    x = torch.randn(10, 6)
    mask = torch.tensor([True] * 7 + [False] * 3)
    padded = torch.cat([x[:7], torch.full((3, 6), 1e4)])
    got = batch_statistics(bn, padded, mask)[:7]
    want = F.batch_norm(x[:7], None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    torch.testing.assert_close(got, want)


def test_per_batch_statistics_patches_only_inside_the_block():
    """diagnostics/pkm_bn.py: a model's query BatchNorms use the batch's statistics inside
    ``per_batch_statistics`` and their running statistics again after it."""
    bn = MaskedBatchNorm1d(4).eval()
    model = torch.nn.Sequential(bn)
    x = torch.randn(8, 4) * 3 + 5
    running = model(x)
    with per_batch_statistics(model):
        torch.testing.assert_close(model(x), batch_statistics(bn, x))
    torch.testing.assert_close(model(x), running)


def test_collect_pkm_usage_tables_curves_and_final_splits(tmp_path):
    """scripts/collect_pkm_usage.py: usage curve from metrics.jsonl "eval" rows, final
    loss/usage from eval-<split>.json, dense runs without usage; a directory that is not
    a run is a one-line error."""
    import json
    import subprocess
    import sys

    def usage(used):
        return {"blocks.1.ffn": {"used": used, "kl_uniform": 1.25, "slots_50": 17507,
                                 "slots_90": 110513}}

    def run(name, usage_fn):
        d = tmp_path / "seed0" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"train": {"seed": 0, "steps": 1000}}))
        rows = [{"step": 10, "loss": 2.0},
                {"step": 500, "eval": {"loss": 1.5, "pkm_usage": usage_fn(0.75)}},
                {"step": 1000, "eval": {"loss": 1.2, "pkm_usage": usage_fn(0.85)}}]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        (d / "eval-test.json").write_text(json.dumps(
            {"loss": 0.8211, "tokens": 524587, "pkm_usage": usage_fn(0.989)}))
        return str(d)

    pkm_run = run("pkm", usage)
    dense_run = run("dense-3L", lambda used: {})
    out = tmp_path / "summary"
    script = [sys.executable, "scripts/collect_pkm_usage.py"]
    res = subprocess.run([*script, pkm_run, dense_run, "--out", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "| seed0/pkm | - | 0.8211 | - | 98.9% | 1.250 | 17,507 / 110,513 |" in res.stdout
    assert "| seed0/dense-3L | - | 0.8211 | - | - | - | - / - |" in res.stdout
    record = json.loads(out.with_suffix(".json").read_text())
    assert [p["used"] for p in record[0]["curve"]] == [0.75, 0.85]
    assert [p["used"] for p in record[1]["curve"]] == [None, None]
    assert out.with_suffix(".png").stat().st_size > 1000
    bad = subprocess.run([*script, str(tmp_path), "--out", str(out)], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error:")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_bn_stats_script_rejects_a_non_run_in_one_line(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "scripts/pkm_bn_stats.py", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode != 0 and res.stderr.strip().startswith("error:")
    assert len(res.stderr.strip().splitlines()) == 1


def test_diagnose_pkm_bn_on_a_trained_run(tiny_corpus, tmp_path, capsys):
    """`memformers diagnose pkm-bn RUN_DIR`: both modes' held-out loss, written next to the
    run; a run without a query BatchNorm is a one-line error."""
    import json

    from memformers.cli import main
    from tests.conftest import TINY_MODEL

    def train(run, *sets):
        args = [x for s in [*TINY_MODEL, f"data.corpus='{tiny_corpus}'", "train.steps=2",
                            "data.eval_max_tokens=256", "model.pkm.layers=[1]",
                            "model.pkm.n_keys=8", "model.pkm.k_dim=16", "model.pkm.top_k=4",
                            "model.pkm.heads=2", *sets] for x in ("--set", s)]
        assert main(["train", "--config", "configs/baseline.toml", *args, "--run-dir",
                     str(run), "--no-progress"]) == 0
        return run

    run = train(tmp_path / "bn")
    assert main(["diagnose", "pkm-bn", str(run), "--max-tokens", "200"]) == 0
    record = json.loads((run / "bn-stats-valid.json").read_text())
    assert set(record) == {"running", "batch"}
    assert record["running"]["tokens"] == record["batch"]["tokens"] > 0
    assert list(record["batch"]["used"]) == ["blocks.1.ffn"]
    capsys.readouterr()
    no_bn = train(tmp_path / "no-bn", "model.pkm.query_norm=none")
    assert main(["diagnose", "pkm-bn", str(no_bn)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
