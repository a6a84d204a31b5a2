"""Search backends for the kNN-LM datastore, on real keys: recall@64 and time per segment.

Keys are demo-base's own normalised final hidden states: one stream walks held-out text
until its datastore holds ``--capacity`` pairs; the next segment's 256 states are the
queries. Each faiss index is built on the same keys and searched twice (the second is
timed); "interleaved" repeats the search between torch matmuls, as inside the model,
where faiss's and torch's OpenMP thread pools compete. Recall is against exact search.

    python benchmarks/bench_knnlm_search.py [--capacity 65536] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from bench_knnlm import long_streams

from memformers.pretrained import load_shipped_model


def real_keys(capacity: int, corpus: Path) -> tuple[np.ndarray, np.ndarray]:
    _, m = load_shipped_model("demo-base", [f"model.knnlm.capacity={capacity}",
                                            "model.knnlm.lam=0.0", "model.knnlm.backend=exact"])
    L = 256
    fill = -(-capacity // L) + 1
    tok = long_streams(corpus, (fill + 1) * L, 1)
    with torch.no_grad():
        for i in range(fill):
            m(tok[:, i * L:(i + 1) * L], new_doc=torch.ones(1, dtype=torch.bool) if i == 0
              else None)
        _, keys, _ = m.features(tok[:, fill * L:(fill + 1) * L])
    xb = m.knnlm.keys[0].float().numpy().copy()
    xq = torch.nn.functional.normalize(keys[0].float(), dim=-1).numpy().copy()
    return xb, xq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--capacity", type=int, default=65536)
    ap.add_argument("--corpus", default="data/stdlib-byte-grouped")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/knnlm_search.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    xb, xq = real_keys(args.capacity, Path(args.corpus))
    d, k = xb.shape[1], args.k
    xbt, xqt = torch.from_numpy(xb), torch.from_numpy(xq)
    t0 = time.perf_counter()
    exact = (xqt @ xbt.T).topk(k).indices.numpy()
    exact_s = time.perf_counter() - t0
    xbh, xqh = xbt.bfloat16(), xqt.bfloat16()  # bf16 on the matrix units (AMX), fp32 top-k
    (xqh @ xbh.T).float().topk(k)
    t0 = time.perf_counter()
    bf16_ids = (xqh @ xbh.T).float().topk(k).indices.numpy()
    bf16_s = time.perf_counter() - t0

    def recall(ids: np.ndarray) -> float:
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact)]))

    def ivf(nlist, nprobe, sq=None):
        q = faiss.IndexFlatIP(d)
        if sq is None:
            ix = faiss.IndexIVFFlat(q, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            ix = faiss.IndexIVFScalarQuantizer(q, d, nlist, sq, faiss.METRIC_INNER_PRODUCT)
        ix.train(xb[: min(len(xb), 32768)])
        ix.nprobe = nprobe
        return ix, q

    def pca_ivf(dims, nlist, nprobe):  # He et al. 2021: search reduced keys (faiss's PCA)
        ix = faiss.IndexPreTransform(faiss.PCAMatrix(d, dims), ivf_of(dims, nlist))
        ix.train(xb[: min(len(xb), 32768)])
        faiss.extract_index_ivf(ix).nprobe = nprobe
        return ix, None

    def ivf_of(dims, nlist):
        return faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dims), dims, nlist,
                                             faiss.ScalarQuantizer.QT_fp16,
                                             faiss.METRIC_INNER_PRODUCT)

    def hnsw(m, ef):
        ix = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        ix.hnsw.efSearch = ef
        return ix, None

    contenders = {
        "ivf 1024 lists / 8 probed (the default)": lambda: ivf(1024, 8),
        "ivf 1024 / 4": lambda: ivf(1024, 4),
        "ivf 256 / 4": lambda: ivf(256, 4),
        "ivf 4096 / 16": lambda: ivf(4096, 16),
        "ivf 1024 / 8, int8 codes": lambda: ivf(1024, 8, faiss.ScalarQuantizer.QT_8bit),
        "ivf 1024 / 8, fp16 codes": lambda: ivf(1024, 8, faiss.ScalarQuantizer.QT_fp16),
        "ivf 1024 / 8 over PCA-128 keys, fp16": lambda: pca_ivf(128, 1024, 8),
        "ivf 1024 / 8 over PCA-64 keys, fp16": lambda: pca_ivf(64, 1024, 8),
        "hnsw M 32, ef 64": lambda: hnsw(32, 64),
        "hnsw M 16, ef 80": lambda: hnsw(16, 80),
    }
    a, w = torch.randn(512, 256), torch.randn(256, 1024)
    rows = {"exact (torch fp32 matmul + top-k)": {"ms": 1000 * exact_s, "recall": 1.0},
            "exact, bf16 scores (torch bf16 matmul + top-k)": {"ms": 1000 * bf16_s,
                                                              "recall": recall(bf16_ids)}}
    for name, make in contenders.items():
        ix, _keep = make()
        t0 = time.perf_counter()
        ix.add(xb)
        add_s = time.perf_counter() - t0
        ix.search(xq, k)
        t0 = time.perf_counter()
        _, ids = ix.search(xq, k)
        warm = time.perf_counter() - t0
        inter = []
        for _ in range(5):
            for _ in range(3):
                (a @ w).sum()
            t0 = time.perf_counter()
            ix.search(xq, k)
            inter.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ix.add(xb[:256])
        add256 = time.perf_counter() - t0
        rows[name] = {"ms": 1000 * warm, "ms_interleaved": 1000 * statistics.median(inter),
                      "recall": recall(ids), "build_s": add_s, "add_256_ms": 1000 * add256}
    print(f"{len(xb):,} real keys of d {d}, {len(xq)} queries, top-{k}, {args.threads} threads")
    print("| search | ms per 256 queries | interleaved with torch | recall@64 | add 256 keys |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['ms']:.1f} | {r.get('ms_interleaved', float('nan')):.1f} | "
              f"{r['recall']:.3f} | {r.get('add_256_ms', float('nan')):.1f} ms |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"capacity": args.capacity, "threads": args.threads,
                                          "rows": rows}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
