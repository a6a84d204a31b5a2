"""Cost of one kNN-memory segment: exact torch search vs faiss, end to end.

Setting (Memorizing Transformers, one kNN layer): B = 2 streams x H = 8 heads
= 16 memories of head dim d = 32, each already full (FIFO steady state) with
``capacity`` unit-norm keys; one segment = 512 queries per memory retrieving
top-32 (search) and then appending the segment's 512 keys/values of every
(stream, head) (add). Times are medians over ``--repeats`` segments; methods
are interleaved within each repeat so machine noise hits them alike.
Recall@32 of each approximate method is measured against the exact result on
the same full memory before the timed segments.

    python benchmarks/bench_knn_search.py            # 65,536 and 262,144 rows
    python benchmarks/bench_knn_search.py --full     # also 1,048,576 rows, and HNSW
    python benchmarks/bench_knn_search.py --capacities 65536 --methods exact flat hnsw

Keys are random unit vectors (no cluster structure: the hardest case for IVF
and HNSW recall).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from memformers.memory.configs import KNNConfig
from memformers.memory.knn_store import KNNStore

B, H = 2, 8


def make_store(method: str, capacity: int, d: int, k: int, block: int, device: str) -> KNNStore:
    """``method``: exact | ring-ivf (the ivf backend, its defaults) | ring-ivf:CODES[:RESCORE]
    (its ``ivf_codes`` and ``ivf_rescore``, e.g. ring-ivf:pq4:128) | flat | hnsw | ivf |
    ivf:NPROBE (the faiss block backend; default nprobe 8)."""
    if method == "exact":
        cfg = KNNConfig(capacity=capacity, top_k=k, backend="exact")
    elif method.startswith("ring-ivf"):
        parts = method.split(":")[1:]
        codes, rescore = (parts + ["auto", "0"][len(parts):])[:2]
        cfg = KNNConfig(capacity=capacity, top_k=k, backend="ivf", ivf_codes=codes,
                        ivf_rescore=int(rescore))
    else:
        index, _, nprobe = method.partition(":")
        cfg = KNNConfig(capacity=capacity, top_k=k, backend="faiss", faiss_index=index,
                        faiss_block=block, faiss_nprobe=int(nprobe or 8))
    store = KNNStore(cfg, H, d)
    store.allocate(B, device)
    return store


def unit(*shape, gen, device):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="add capacity 1,048,576 and HNSW")
    ap.add_argument("--capacities", type=int, nargs="*", default=None)
    ap.add_argument("--methods", nargs="*", default=None,
                    help="exact, ring-ivf[:CODES[:RESCORE]] (the ivf backend), flat, hnsw, ivf "
                         "or ivf:NPROBE "
                         "(faiss blocks; default: all but hnsw; --full adds hnsw, whose "
                         "graph build is slow)")
    ap.add_argument("--queries", type=int, default=512, help="queries per memory per segment")
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--block", type=int, default=16384, help="faiss FIFO block size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch and faiss threads (0: keep)")
    ap.add_argument("--device", default="cpu", help="device of the exact backend's memory")
    ap.add_argument("--out", default="benchmarks/results/knn_search.json")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    caps = args.capacities or ([65536, 262144] + ([1 << 20] if args.full else []))
    if args.methods is None:
        args.methods = ["exact", "flat", "ivf", "ivf:64"] + (["hnsw"] if args.full else [])
    S, Q, d, k = B * H, args.queries, args.d, args.k
    rows = []
    print(f"{S} memories (B={B} x H={H}), d={d}, {Q} queries/memory/segment, top-{k}, "
          f"torch threads {torch.get_num_threads()}, exact on {args.device}")
    hdr = f"{'capacity':>9} {'method':>7} {'search_s':>9} {'add_s':>8} {'segment_s':>9} " \
          f"{'vs_flat':>7} {'recall@k':>8} {'fill_s':>7}"
    print(hdr)
    for cap in caps:
        methods = list(args.methods)
        gen = torch.Generator().manual_seed(0)
        fill_k = unit(B, H, cap, d, gen=gen, device="cpu")
        fill_v = torch.randn(B, H, cap, d, generator=gen)
        stores, fill_s = {}, {}
        for m in methods:
            dev = args.device if m == "exact" else "cpu"
            t0 = time.perf_counter()
            st = make_store(m, cap, d, k, min(args.block, cap), dev)
            st.write(fill_k.to(dev), fill_v.to(dev), torch.ones(B, cap, dtype=torch.bool))
            sync(dev)
            fill_s[m] = time.perf_counter() - t0
            stores[m] = st
        del fill_k, fill_v
        gc.collect()

        # recall@k against exact on the same full memory
        q0 = unit(S, Q, d, gen=gen, device="cpu")
        exact_i = None
        recall = {}
        if "exact" in stores:
            _, exact_i = stores["exact"].search(q0.to(args.device), k)
            exact_i = exact_i.cpu()
        for m in methods:
            if m == "exact" or exact_i is None:
                continue
            _, ai = stores[m].search(q0, k)
            hit = (ai[..., :, None] == exact_i[..., None, :]).any(-1) & (ai >= 0)
            recall[m] = hit.sum().item() / exact_i.numel()

        # timed segments: search then add this segment's keys (FIFO evicts the oldest)
        t_search = {m: [] for m in methods}
        t_add = {m: [] for m in methods}
        for _ in range(args.repeats):
            q = unit(S, Q, d, gen=gen, device="cpu")
            seg_k = unit(B, H, Q, d, gen=gen, device="cpu")
            seg_v = torch.randn(B, H, Q, d, generator=gen)
            mask = torch.ones(B, Q, dtype=torch.bool)
            for m in methods:
                dev = args.device if m == "exact" else "cpu"
                qd, kd, vd = q.to(dev), seg_k.to(dev), seg_v.to(dev)
                sync(dev)
                t0 = time.perf_counter()
                stores[m].search(qd, k)
                sync(dev)
                t1 = time.perf_counter()
                stores[m].write(kd, vd, mask.to(dev))
                sync(dev)
                t2 = time.perf_counter()
                t_search[m].append(t1 - t0)
                t_add[m].append(t2 - t1)
        med = {m: (statistics.median(t_search[m]), statistics.median(t_add[m]))
               for m in methods}
        flat_seg = sum(med["flat"]) if "flat" in med else None
        for m in methods:
            s, a = med[m]
            ratio = (s + a) / flat_seg if flat_seg else float("nan")
            row = dict(capacity=cap, method=m, search_s=s, add_s=a, segment_s=s + a,
                       vs_flat=ratio, recall_at_k=recall.get(m, 1.0 if m == "exact" else None),
                       fill_s=fill_s[m], repeats=args.repeats,
                       search_all=t_search[m], add_all=t_add[m])
            rows.append(row)
            rec = f"{row['recall_at_k']:.3f}" if row["recall_at_k"] is not None else "-"
            print(f"{cap:>9} {m:>7} {s:>9.3f} {a:>8.3f} {s + a:>9.3f} {ratio:>7.2f} "
                  f"{rec:>8} {fill_s[m]:>7.1f}", flush=True)
        del stores
        gc.collect()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(memories=S, batch=B, heads=H, d=d, queries=Q, k=k, block=args.block,
                torch_threads=torch.get_num_threads(), device=args.device,
                torch=torch.__version__)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
