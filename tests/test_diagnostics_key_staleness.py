import torch

from memformers.config import ModelConfig
from memformers.diagnostics.key_staleness import key_overlap, snapshot
from memformers.memory.configs import KNNConfig
from memformers.memory.state import collect_state_tensors
from memformers.model import MemformerLM
from memformers.runner import segments_of

L, TOP_K = 8, 4


def tiny(combine="gate"):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, head_dim=16, d_ff=64, vocab_size=20,
                      xl_cache=True, knn=KNNConfig(layers=[1], capacity=64, top_k=TOP_K,
                                                   storage_dtype="float32", combine=combine))
    return MemformerLM(cfg).eval()


def stream(n_segments=4, batch=2):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 20, (batch, n_segments * L + 1), generator=g)
    return segments_of(tokens[:, :-1], L, tokens[:, 1:])


def perturbed(model, how):
    old = snapshot(model)
    w = old["blocks.1.attn.qkv.weight"]  # rows: q (H d), k (H d), v (H d)
    d = w.shape[0] // 3
    if how == "negate_keys":
        w[d:2 * d] = -w[d:2 * d]
    else:  # noise on the key projection
        w[d:2 * d] += 0.5 * torch.randn(d, w.shape[1], generator=torch.Generator().manual_seed(2))
    return old


def brute_force(model, old_weights, segments):
    """Reference: record every stored key (gate mode: each segment's k, written after it
    searched) under both weights, then exact top-k of the last segment's fresh queries."""
    memory = model.blocks[1].attn.memory

    def keys_and_queries(weights):
        now = snapshot(model)
        model.load_state_dict(weights)
        seen = []
        h = memory.register_forward_pre_hook(lambda m, a: seen.append((a[0].clone(),
                                                                         a[1].clone())))
        model.allocate_state(segments[0].tokens.shape[0])
        with torch.no_grad():
            for s in segments:
                model(s.tokens, new_doc=s.new_doc, mask=s.mask)
        h.remove()
        model.load_state_dict(now)
        keys = torch.cat([k for _, k in seen[:-1]], dim=2)  # (B, H, (M) L, d)
        return keys, seen[-1][0]

    k_old, _ = keys_and_queries(old_weights)
    k_new, q = keys_and_queries(snapshot(model))
    top_new = (q @ k_new.transpose(-1, -2)).topk(TOP_K, dim=-1).indices  # (B, H, L, k)
    top_old = (q @ k_old.transpose(-1, -2)).topk(TOP_K, dim=-1).indices
    same = (top_new[..., :, None] == top_old[..., None, :]).any(-1).float()
    return same.mean(-1).mean((0, 2))  # (H,)


def test_unchanged_weights_give_full_overlap():
    model = tiny()
    assert key_overlap(model, snapshot(model), stream()) == {"blocks.1": [1.0, 1.0]}


def test_overlap_equals_a_brute_force_reference():
    model = tiny()
    segments = stream()
    old = perturbed(model, "noise")
    got = key_overlap(model, old, segments)["blocks.1"]
    want = brute_force(model, old, segments)
    assert 0.0 < min(got) < 1.0  # the perturbation moved some of the top-k
    assert torch.allclose(torch.tensor(got), want.float(), atol=1e-4)


def test_negated_keys_retrieve_the_opposite_pairs():
    model = tiny()
    # 24 stored keys, top 4: the nearest under the negated keys are the farthest fresh ones
    got = key_overlap(model, perturbed(model, "negate_keys"), stream())["blocks.1"]
    assert max(got) == 0.0


def test_weights_and_stream_state_are_given_back():
    model = tiny(combine="joint")
    model.allocate_state(2)
    for s in stream(2):
        with torch.no_grad():
            model(s.tokens, new_doc=s.new_doc, mask=s.mask)
    weights, state = snapshot(model), collect_state_tensors(model)
    out = key_overlap(model, perturbed(model, "noise"), stream(5))
    assert set(out) == {"blocks.1"}  # joint: the memory holds what left the window
    assert all(torch.equal(weights[k], v) for k, v in snapshot(model).items())
    after = collect_state_tensors(model)
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_cli_compares_a_checkpoint_with_the_final_weights(tiny_corpus, tmp_path, capsys):
    """`memformers diagnose key-staleness RUN --old CHECKPOINT`: per-head overlaps written
    next to the run; the run against itself is not stale; bad input is one line, exit 2."""
    import json

    from memformers.cli import main
    from tests.conftest import TINY_MODEL

    run = tmp_path / "run"
    args = [x for s in [*TINY_MODEL, f"data.corpus='{tiny_corpus}'", "train.steps=4",
                        "train.ckpt_every=2", "train.lr=1e-2", "model.xl_cache=true",
                        "model.knn.layers=[1]", "model.knn.capacity=256"] for x in ("--set", s)]
    assert main(["train", *args, "--run-dir", str(run), "--no-progress"]) == 0
    old = run / "checkpoints" / "step_0000002"
    assert main(["diagnose", "key-staleness", str(run), "--old", str(old),
                 "--segments", "3"]) == 0
    rec = json.loads((run / "key-staleness-valid.json").read_text())
    heads = rec["overlap"]["blocks.1"]
    assert rec["segments"] == 4 and len(heads) == 4 and all(0 <= x <= 1 for x in heads)
    assert "blocks.1: top-k overlap" in capsys.readouterr().out
    assert main(["diagnose", "key-staleness", str(run), "--old", str(run),
                 "--segments", "3"]) == 0
    same = json.loads((run / "key-staleness-valid.json").read_text())["overlap"]["blocks.1"]
    assert same == [1.0] * 4
    capsys.readouterr()
    assert main(["diagnose", "key-staleness", str(run), "--old", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no weights at") and err.count("\n") == 1
