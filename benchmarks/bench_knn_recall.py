"""Recall and cost of approximate kNN search on keys recorded from trained models.

Random unit vectors are the worst case for any index; the keys a memory really holds
come from documents and cluster in time and content. This records them:

* ``demo-base`` / ``passkey-knn``: the kNN layer's normalised keys and queries (d 32,
  8 heads) of two streams of real documents (the two longest of ``--split``; passkey
  prompts for passkey-knn), captured when the ring holds ``--capacity`` rows;
* ``knnlm``: demo-base's final hidden states (d 256, cosine), the kNN-LM's datastore
  keys and queries, on the same documents;

then scores each with exact search and with the block backend (``BlockSearch``) over a
grid of (block_size, block_probe, block_group): recall@k against exact, and the median
search time of one segment's queries (methods interleaved in every repeat).

    python benchmarks/bench_knn_recall.py --split valid --out benchmarks/results/knn_recall_valid.json
    python benchmarks/bench_knn_recall.py --split test --grid 64:32:16 \
        --out benchmarks/results/knn_recall_test.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from memformers.data.corpus import CorpusSplit
from memformers.data.tokenizer import ByteTokenizer
from memformers.memory.configs import KNNConfig
from memformers.memory.knn_store import KNNStore
from memformers.pretrained import load_shipped_model
from memformers.runner import SegmentRunner, segments_of
from memformers.tasks.passkey import make_passkey_example


def record_streams(model_name: str, tokens: torch.Tensor, capacity: int, segment_len: int):
    """Feed (2, T) tokens; return {kind: (keys (S, C, d), queries (S, Q, d))} captured at
    the first segment that finds the kNN ring full (and its kNN-LM features)."""
    _, model = load_shipped_model(model_name, [f"model.knn.capacity={capacity}"])
    memory = next(m for n, m in model.named_modules() if n.endswith("attn.memory"))
    store = memory.store
    captured = {}

    def grab(_module, args):
        q = args[0]  # (B, H, L, d) normalised queries, what the search sees
        if "knn" not in captured and int(store.count.min()) >= capacity:
            B, H, L, d = q.shape
            keys, _ = store.memory_view()
            captured["knn"] = (keys.clone(), q.detach().float().reshape(B * H, L, d))

    hook = memory.register_forward_pre_hook(grab)
    feats = []
    runner = SegmentRunner(model)
    with runner.fresh_state(tokens.shape[0]):
        for seg in segments_of(tokens, segment_len):
            h, _, _ = model.features(seg.tokens, new_doc=seg.new_doc, mask=seg.mask)
            feats.append(torch.nn.functional.normalize(h.float(), dim=-1))
            if "knn" in captured:
                break
    hook.remove()
    if "knn" not in captured:
        raise SystemExit(f"{model_name}: the documents never fill a {capacity}-row memory")
    h = torch.cat(feats, 1)  # (B, T', 256)
    n = h.shape[1]
    captured["knnlm"] = (h[:, n - segment_len - capacity:n - segment_len].half(),
                         h[:, n - segment_len:])
    return captured


def store_of(keys: torch.Tensor, cfg: KNNConfig) -> KNNStore:
    S, C, d = keys.shape
    store = KNNStore(cfg, 1, d)
    store.allocate(S, "cpu")
    store.load_state_tensors({"count": torch.full((S,), C), "keys": keys[:, None].half(),
                              "values": torch.zeros(S, 1, C, d, dtype=torch.float16)})
    return store


def measure(keys, queries, grid, k: int, repeats: int) -> list[dict]:
    C = keys.shape[1]
    stores = {"exact": store_of(keys, KNNConfig(capacity=C, top_k=k, backend="exact"))}
    for bs, probe, group in grid:
        stores[f"block {bs}:{probe}:{group}"] = store_of(keys, KNNConfig(
            capacity=C, top_k=k, backend="block", block_size=bs, block_probe=probe,
            block_group=group))
    truth = stores["exact"].search(queries, k)[1]  # (S, Q, k)
    rows, times = {}, {name: [] for name in stores}
    for name, store in stores.items():
        slots = store.search(queries, k)[1]
        hit = (slots[..., :, None] == truth[..., None, :]).any(-1).float().mean()
        rows[name] = {"method": name, "recall": round(float(hit), 4)}
    for _ in range(repeats):  # interleaved
        for name, store in stores.items():
            t = time.perf_counter()
            store.search(queries, k)
            times[name].append(time.perf_counter() - t)
    exact = statistics.median(times["exact"])
    for name in stores:
        med = statistics.median(times[name])
        rows[name].update(seconds=round(med, 4), speedup=round(exact / med, 2))
    return list(rows.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", default="valid")
    p.add_argument("--corpus", default="data/stdlib-byte-grouped")
    p.add_argument("--capacity", type=int, default=65536)
    p.add_argument("--segment-len", type=int, default=256)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--grid", nargs="+", default=[
        "32:32:16", "64:8:16", "64:16:16", "64:32:16", "64:64:16", "64:32:1", "64:32:64",
        "128:16:16", "128:32:16"], help="block_size:block_probe:block_group")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = [tuple(int(x) for x in g.split(":")) for g in args.grid]
    torch.manual_seed(0)
    need = args.capacity + 2 * args.segment_len
    split = CorpusSplit.open(args.corpus, args.split)
    longest = sorted(range(split.n_docs), key=split.doc_len, reverse=True)[:2]
    if split.doc_len(longest[-1]) < need:
        raise SystemExit(f"the {args.split} split has fewer than two documents of {need} tokens")
    docs = torch.stack([torch.as_tensor(split.doc(i)[:need].astype(np.int64)) for i in longest])
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    prompts = torch.stack([torch.as_tensor(make_passkey_example(tok, need, depth, rng).tokens)
                           for depth in (0.2, 0.6)])
    sets = {}
    for name, tokens in (("demo-base", docs), ("passkey-knn", prompts)):
        rec = record_streams(name, tokens, args.capacity, args.segment_len)
        sets[f"{name} kNN layer"] = rec["knn"]
        if name == "demo-base":
            sets["demo-base kNN-LM datastore"] = rec["knnlm"]
    results = {"split": args.split, "capacity": args.capacity, "k": args.k,
               "threads": torch.get_num_threads(), "sets": {}}
    for name, (keys, queries) in sets.items():
        rows = measure(keys, queries, grid, args.k, args.repeats)
        results["sets"][name] = {"memories": keys.shape[0], "dim": keys.shape[2],
                                 "queries": queries.shape[1], "rows": rows}
        print(f"\n{name}: {keys.shape[0]} memories x {keys.shape[1]:,} keys of d {keys.shape[2]}"
              f", {queries.shape[1]} queries each")
        print(f"| method | recall@{args.k} | s per segment | speed-up |\n|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['method']} | {r['recall']:.3f} | {r['seconds']:.4f} | "
                  f"{r['speedup']:.1f}x |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
