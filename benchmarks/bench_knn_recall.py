"""Recall and cost of approximate kNN search on keys recorded from trained models.

Random unit vectors are the worst case for any index; the keys a memory really holds
come from documents and cluster in time and content. This records them:

* ``demo-base`` / ``passkey-knn``: the kNN layer's normalised keys and queries (d 32,
  8 heads) of two streams of real documents (the two longest of ``--split``; passkey
  prompts for passkey-knn), captured when the ring holds ``--capacity`` rows;
* ``knnlm``: demo-base's final hidden states (d 256, cosine), the kNN-LM's datastore
  keys and queries, on the same documents;

then scores each with exact search and with the approximate backends over a grid --
``ivf:NLIST:NPROBE:TRAIN`` (``IVFSearch``, centroids trained on the first TRAIN keys of
each head, in the order the memory received them), ``exact:DTYPE:RERANK`` (exact search
with bfloat16 or float16 scores, the best RERANK candidates rescored in fp32; 0 = 2k) and
``block:SIZE:PROBE:GROUP``
(``BlockSearch``): recall@k against exact, and the median search time of one segment's
queries (methods interleaved in every repeat).

    python benchmarks/bench_knn_recall.py --split valid \
        --out benchmarks/results/knn_recall_valid.json
    python benchmarks/bench_knn_recall.py --split test --grid ivf:1024:32:16384 \
        --out benchmarks/results/knn_recall_test.json
    # 4-bit product codes, short-lists of 128 / 256 rescored exactly
    python benchmarks/bench_knn_recall.py --split test --record-backend ivf \
        --grid ivf:0:64:0 ivf:0:64:0:pq4:128 ivf:0:64:0:pq4:256 \
        --out benchmarks/results/knn_recall_pq4_test.json
    # larger memories on long documents (scripts/long_memory_eval.py builds the corpus)
    python benchmarks/bench_knn_recall.py --corpus runs/long-memory/corpus-perl --split test \
        --capacity 262144 --models demo-base --record-backend ivf --grid ivf:0:64:0
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


def record_streams(model_name: str, tokens: torch.Tensor, capacity: int, segment_len: int,
                   backend: str = "exact"):
    """Feed (2, T) tokens; return {kind: (keys (S, C, d), queries (S, Q, d))} captured at
    the first segment that finds the kNN ring full (and its kNN-LM features). The kNN
    layer's keys and queries do not depend on the ``backend`` the model searches with
    while recording (they are computed before its retrieval); the final hidden states do."""
    _, model = load_shipped_model(model_name, [f"model.knn.capacity={capacity}",
                                               f"model.knn.backend={backend}"])
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
    captured["knnlm"] = (h[:, n - segment_len - capacity:n - segment_len].half().contiguous(),
                         h[:, n - segment_len:].contiguous())
    return captured


def store_of(keys: torch.Tensor, cfg: KNNConfig, heads: int) -> KNNStore:
    """A store holding ``keys`` (S = B x heads, C, d) as B streams of ``heads`` memories,
    written segment by segment in ring order as a model writes them (so an IVF index
    trains each head's centroids on the first keys of that head)."""
    S, C, d = keys.shape
    store = KNNStore(cfg, heads, d)
    store.allocate(S // heads, "cpu")
    view = keys.view(S // heads, heads, C, d)
    for a in range(0, C, 512):
        k = view[:, :, a:a + 512]
        store.write(k, torch.zeros_like(k), torch.ones(S // heads, k.shape[2], dtype=torch.bool))
    return store


def config_of(method: str, C: int, k: int) -> KNNConfig:
    kind, *v = method.split(":")
    if kind == "ivf":  # [:CODES[:RESCORE]]: ivf_codes (e.g. pq4) and its short-list
        return KNNConfig(capacity=C, top_k=k, backend="ivf", ivf_nlist=int(v[0]),
                         ivf_nprobe=int(v[1]), ivf_train=int(v[2]),
                         ivf_codes=v[3] if len(v) > 3 else "auto",
                         ivf_rescore=int(v[4]) if len(v) > 4 else 0)
    if kind == "exact":  # DTYPE[:RERANK]: scores in bfloat16 / float16, re-ranked in fp32
        return KNNConfig(capacity=C, top_k=k, backend="exact", search_dtype=v[0],
                         search_rerank=int(v[1]) if len(v) > 1 else 0)
    if kind == "block":
        return KNNConfig(capacity=C, top_k=k, backend="block", block_size=int(v[0]),
                         block_probe=int(v[1]), block_group=int(v[2]))
    raise SystemExit(f"unknown method {method}: ivf:NLIST:NPROBE:TRAIN[:CODES[:RESCORE]], "
                     f"exact:DTYPE[:RERANK] or block:SIZE:PROBE:GROUP")


def measure(keys, queries, grid, k: int, repeats: int, heads: int) -> list[dict]:
    C = keys.shape[1]
    stores = {"exact": store_of(keys, KNNConfig(capacity=C, top_k=k, backend="exact"), heads)}
    for method in grid:
        stores[method] = store_of(keys, config_of(method, C, k), heads)
    kth, truth = stores["exact"].search(queries, k)  # (S, Q, k)
    kth = kth[..., -1:]  # the true k-th score
    rows, times = {}, {name: [] for name in stores}
    for name, store in stores.items():
        slots = store.search(queries, k)[1]
        hit = (slots[..., :, None] == truth[..., None, :]).any(-1).float().mean()
        # tie-aware: a returned row scoring at least the true k-th counts (duplicate keys,
        # e.g. a passkey prompt's repeated filler, make the ids of the top-k arbitrary)
        got = torch.einsum("sqd,sqkd->sqk", queries, keys.float()[
            torch.arange(keys.shape[0])[:, None, None], slots.clamp(min=0)])
        tie = ((got >= kth - 1e-5) & (slots >= 0)).float().mean()
        rows[name] = {"method": name, "recall": round(float(hit), 4),
                      "recall_ties": round(float(tie), 4)}
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
        "ivf:256:16:16384", "ivf:1024:16:16384", "ivf:1024:32:16384", "ivf:1024:64:16384",
        "ivf:1024:32:65536", "ivf:4096:64:65536", "block:64:32:16", "block:64:32:1"],
        help="ivf:NLIST:NPROBE:TRAIN[:CODES[:RESCORE]] (0 = the default, e.g. ivf:0:64:0; "
             "ivf:0:64:0:pq4:256), exact:DTYPE[:RERANK] (e.g. exact:bfloat16:0) or "
             "block:SIZE:PROBE:GROUP")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models", default="demo-base,passkey-knn",
                   help="whose keys to record (demo-base also gives the kNN-LM datastore)")
    p.add_argument("--record-backend", default="exact",
                   help="search backend of the model while recording (ivf: faster for "
                        "large capacities; changes only the kNN-LM datastore's keys)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = args.grid
    torch.manual_seed(0)
    need = args.capacity + 2 * args.segment_len
    split = CorpusSplit.open(args.corpus, args.split)
    longest = sorted(range(split.n_docs), key=split.doc_len, reverse=True)[:2]
    if split.doc_len(longest[-1]) < need:
        raise SystemExit(f"the {args.split} split has fewer than two documents of {need} tokens")
    docs = torch.stack([torch.as_tensor(split.doc(i)[:need].astype(np.int64)) for i in longest])
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    prompts = (torch.stack([torch.as_tensor(make_passkey_example(tok, need, depth, rng).tokens)
                            for depth in (0.2, 0.6)])
               if "passkey-knn" in args.models.split(",") else None)
    sets = {}
    for name, tokens in (("demo-base", docs), ("passkey-knn", prompts)):
        if name not in args.models.split(","):
            continue
        rec = record_streams(name, tokens, args.capacity, args.segment_len,
                             args.record_backend)
        sets[f"{name} kNN layer"] = rec["knn"]
        if name == "demo-base":
            sets["demo-base kNN-LM datastore"] = rec["knnlm"]
    results = {"corpus": args.corpus, "split": args.split, "capacity": args.capacity,
               "k": args.k, "record_backend": args.record_backend,
               "threads": torch.get_num_threads(), "sets": {}}
    for name, (keys, queries) in sets.items():
        heads = 1 if "kNN-LM" in name else keys.shape[0] // 2  # two streams each
        rows = measure(keys, queries, grid, args.k, args.repeats, heads)
        results["sets"][name] = {"memories": keys.shape[0], "dim": keys.shape[2],
                                 "queries": queries.shape[1], "rows": rows}
        print(f"\n{name}: {keys.shape[0]} memories x {keys.shape[1]:,} keys of d {keys.shape[2]}"
              f", {queries.shape[1]} queries each")
        print(f"| method | recall@{args.k} | tie-aware | s per segment | speed-up |\n"
              f"|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['method']} | {r['recall']:.3f} | {r['recall_ties']:.3f} | "
                  f"{r['seconds']:.4f} | {r['speedup']:.1f}x |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
