"""Could a torch-native IVF (inverted lists scored by batched matmuls) beat faiss here?

faiss scores each (query, probed list) pair on its own: at d 32 that runs at a few
GFLOP/s per core, far below the matrix units. The alternative the issue names scores
list-major: every probed list's keys against all the queries that probe it, as one
batched matmul of (query tile x key chunk) blocks, then a top-k over each query's
candidates. It also needs no copy of the keys (the ids-only index of the footprint
target), because the chunks are gathered from the ring.

This times the dense kernels of that design on recorded keys and lists, and gives it
every index for free: the sort of the keys by list, the chunk and tile tables and
the scatter positions are built before the clock starts. So the sum is a floor
for its search time, and the real search would cost more. The kernels timed are:

1. gather the probed chunks' keys from the ring (``Lc`` rows a chunk);
2. gather the query tiles (``Qc`` queries probing one chunk);
3. one ``bmm`` of all tiles, fp32 or bf16 (AMX);
4. scatter the scores into each query's candidate row, and take the top-k.

The first segment of keys and queries that fills a 65,536-row ring is recorded from
demo-base's kNN layer, on the two longest documents of ``--split``: 16 memories of d 32,
256 queries each. ``--keys knnlm`` takes the kNN-LM's datastore instead (one stream of
demo-base's normalised final states, d 256, and the next segment's 256 queries: the
keys of ``bench_knnlm_search.py``), where each query probes fewer lists and a key is 8x
longer, the regime most favourable to matmuls.

The baseline is faiss IVF with fp16 codes (the ``ivf`` backend's layout) over the same
lists and probes, the memories' searches run side by side as the backend runs them. The
GEMM path's top-k is checked against faiss's, since both score the same candidates.
Medians of ``--repeats``, the contenders interleaved.

    python benchmarks/bench_knn_gemm_floor.py --out benchmarks/results/knn_gemm_floor.json
    python benchmarks/bench_knn_gemm_floor.py --keys knnlm --nprobe 8 --k 64 --chunk 32 \
        --tile 8 --out benchmarks/results/knnlm_gemm_floor.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_knn_codes import recorded  # noqa: E402

from memformers.memory.ivf import _side_by_side  # noqa: E402

STAGES = ("gather keys", "gather queries", "bmm + mask", "scatter + top-k")


def layout(lists_of_key: np.ndarray, probes: np.ndarray, nlist: int, Lc: int, Qc: int):
    """The list-major tables for S memories: keys (S, C) -> list, probes (S, Q, P).
    -> dict of index tensors (built once, outside the timing)."""
    S, C = lists_of_key.shape
    Q, P = probes.shape[1], probes.shape[2]
    gid = torch.from_numpy(lists_of_key + nlist * np.arange(S)[:, None]).flatten()  # (S*C,)
    order = torch.argsort(gid, stable=True)  # flat ring rows, by (memory, list)
    count = torch.bincount(gid, minlength=S * nlist)  # (S*nlist,)
    start = torch.cumsum(count, 0) - count
    n_chunk = (count + Lc - 1) // Lc
    chunk_list = torch.repeat_interleave(torch.arange(S * nlist), n_chunk)  # (Nc,)
    first_chunk = torch.cumsum(n_chunk, 0) - n_chunk
    within = torch.arange(len(chunk_list)) - first_chunk[chunk_list]
    row0 = start[chunk_list] + within * Lc  # first sorted row of each chunk
    offs = torch.arange(Lc)
    valid = (within[:, None] * Lc + offs) < count[chunk_list][:, None]  # (Nc, Lc)
    rows = order[(row0[:, None] + offs).clamp(max=S * C - 1)]  # (Nc, Lc) flat ring rows
    rows = torch.where(valid, rows, 0)
    # (query, probe) pairs -> (query, chunk) pairs
    pg = torch.from_numpy(probes + nlist * np.arange(S)[:, None, None]).flatten()  # (S*Q*P,)
    pq = torch.arange(S * Q).repeat_interleave(P)  # the query of each pair
    reps = n_chunk[pg]
    pc_query = pq.repeat_interleave(reps)
    pc_chunk = (first_chunk[pg].repeat_interleave(reps)
                + torch.arange(int(reps.sum())) - (torch.cumsum(reps, 0) - reps)
                .repeat_interleave(reps))
    # the slot of each (query, chunk) pair in its query's candidate row
    per_q = torch.bincount(pc_query, minlength=S * Q)
    q_start = torch.cumsum(per_q, 0) - per_q
    pc_rank = torch.arange(len(pc_query)) - q_start[pc_query]
    R = int(per_q.max())
    # tiles: the pairs of one chunk, Qc at a time
    by_chunk = torch.argsort(pc_chunk, stable=True)
    cq, cc, cr = pc_query[by_chunk], pc_chunk[by_chunk], pc_rank[by_chunk]
    per_c = torch.bincount(cc, minlength=len(chunk_list))
    c_start = torch.cumsum(per_c, 0) - per_c
    r_in_c = torch.arange(len(cc)) - c_start[cc]
    tiles_per_c = (per_c + Qc - 1) // Qc
    tile0 = torch.cumsum(tiles_per_c, 0) - tiles_per_c
    tile = tile0[cc] + r_in_c // Qc
    T = int(tiles_per_c.sum())
    tile_chunk = torch.repeat_interleave(torch.arange(len(chunk_list)), tiles_per_c)
    tile_q = torch.full((T, Qc), 0, dtype=torch.long)
    tile_ok = torch.zeros(T, Qc, dtype=torch.bool)
    tile_q[tile, r_in_c % Qc] = cq
    tile_ok[tile, r_in_c % Qc] = True
    # score (tile, row, j) -> candidate (query, rank * Lc + j)
    dest_row = tile_q
    dest_col = torch.zeros(T, Qc, dtype=torch.long)
    dest_col[tile, r_in_c % Qc] = cr
    return dict(rows=rows, valid=valid, tile_chunk=tile_chunk, tile_q=tile_q,
                tile_ok=tile_ok, dest_row=dest_row, dest_col=dest_col, R=R, T=T,
                n_chunks=len(chunk_list), pairs=len(pc_query), S=S, Q=Q)


def gemm_search(keys_flat, queries_flat, lay, Lc: int, k: int, dtype, ws: dict,
                marks: list | None = None):
    """The timed kernels: -> (scores (S*Q, k), candidate columns (S*Q, k)). ``ws``: reused
    output buffers, as a real backend would keep (on this VM a fresh large tensor costs
    more in page faults than the kernel that fills it). ``marks``: a list to append the
    time after each of the four stages to."""
    mark = (lambda: marks.append(time.perf_counter())) if marks is not None else (lambda: None)
    d = keys_flat.shape[1]
    rows, tc, tq, ok = lay["rows"], lay["tile_chunk"], lay["tile_q"], lay["tile_ok"]
    if not ws:
        T, Qc = tq.shape
        ws.update(kc=torch.empty(rows.numel(), d, dtype=keys_flat.dtype),
                  kt=torch.empty(T * Lc, d, dtype=dtype), qt=torch.empty(T * Qc, d, dtype=dtype),
                  sc=torch.empty(T, Qc, Lc, dtype=dtype),
                  cand=torch.empty(lay["S"] * lay["Q"], lay["R"] * Lc),
                  pad=~lay["valid"][tc][:, None, :], sel=ok.nonzero(as_tuple=True),
                  kd=keys_flat.to(dtype), qd=queries_flat.to(dtype),
                  kt_rows=rows[tc].flatten(), dest=(lay["dest_row"][ok], lay["dest_col"][ok]))
    mark()
    torch.index_select(ws["kd"], 0, ws["kt_rows"], out=ws["kt"])  # 1. the chunks' keys
    mark()
    torch.index_select(ws["qd"], 0, tq.flatten(), out=ws["qt"])  # 2. the query tiles
    mark()
    T, Qc = tq.shape
    torch.bmm(ws["qt"].view(T, Qc, d), ws["kt"].view(T, Lc, d).transpose(1, 2),
              out=ws["sc"])  # 3. (T, Qc, Lc)
    ws["sc"].masked_fill_(ws["pad"], float("-inf"))
    mark()
    cand = ws["cand"].fill_(float("-inf")).view(len(ws["cand"]), lay["R"], Lc)  # 4.
    cand.index_put_(ws["dest"], ws["sc"][ws["sel"]].float())
    s, j = ws["cand"].topk(k, dim=1)
    mark()
    return s, j


def _rows_of(lay, j, Lc):
    """Candidate columns (S*Q, k) -> flat ring rows (outside the floor's kernels)."""
    ok = lay["tile_ok"]
    chunk_of = lay["tile_chunk"][:, None].expand_as(lay["tile_q"])
    cand_chunk = torch.zeros(lay["S"] * lay["Q"], lay["R"], dtype=torch.long)
    cand_chunk[lay["dest_row"][ok], lay["dest_col"][ok]] = chunk_of[ok]
    return lay["rows"][cand_chunk.gather(1, j // Lc), j % Lc]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", choices=("knn", "knnlm"), default="knn",
                    help="the kNN layer's rings, or the kNN-LM's datastore")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--corpus", default="data/stdlib-byte-grouped")
    ap.add_argument("--capacity", type=int, default=65536)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64, help="keys per chunk (Lc)")
    ap.add_argument("--tile", type=int, default=32, help="queries per tile (Qc)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/knn_gemm_floor.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    if args.keys == "knn":
        K, Qr = recorded(args.split, args.corpus, args.capacity)  # (S, C, d), (S, Q, d)
    else:
        from bench_knnlm_search import real_keys
        xb, xq = real_keys(args.capacity, Path(args.corpus))
        K, Qr = xb[None], xq[None]
    S, C, d = K.shape
    ip = faiss.METRIC_INNER_PRODUCT
    indexes, lists_of_key, probes = [], [], []
    for s in range(S):  # one quantizer per memory, trained on its first 16K keys
        km = faiss.Kmeans(d, args.nlist, niter=10, seed=1234, spherical=True,
                          min_points_per_centroid=1)
        km.train(np.ascontiguousarray(K[s, :16384]))
        qz = faiss.IndexFlatIP(d)
        qz.add(km.centroids)
        ix = faiss.IndexIVFScalarQuantizer(qz, d, args.nlist, faiss.ScalarQuantizer.QT_fp16,
                                           ip, False)
        ix.is_trained = True
        ix.add(np.ascontiguousarray(K[s]))
        ix.nprobe = args.nprobe
        indexes.append((ix, qz))
        lists_of_key.append(qz.search(np.ascontiguousarray(K[s]), 1)[1][:, 0])
        probes.append(qz.search(np.ascontiguousarray(Qr[s]), args.nprobe)[1])
    lay = layout(np.stack(lists_of_key), np.stack(probes), args.nlist, args.chunk, args.tile)
    keys_flat = torch.from_numpy(K).half().reshape(S * C, d)  # the ring: fp16 keys
    q_flat = torch.from_numpy(Qr).reshape(-1, d)

    def run_faiss():
        return _side_by_side(lambda s: indexes[s][0].search(np.ascontiguousarray(Qr[s]),
                                                              args.k), list(range(S)), faiss)

    ws32, ws16 = {}, {}
    contenders = {"faiss IVF fp16 codes": run_faiss,
                  "GEMM floor, fp32": lambda: gemm_search(keys_flat, q_flat, lay, args.chunk,
                                                          args.k, torch.float32, ws32),
                  "GEMM floor, bf16 (AMX)": lambda: gemm_search(keys_flat, q_flat, lay,
                                                                args.chunk, args.k,
                                                                torch.bfloat16, ws16)}
    times = {n: [] for n in contenders}
    stages = {n: [] for n in list(contenders)[1:]}
    results = {n: f() for n, f in contenders.items()}  # warm-up, and the results
    for _ in range(args.repeats):
        for n, f in contenders.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
        for n, ws, dt in (("GEMM floor, fp32", ws32, torch.float32),
                          ("GEMM floor, bf16 (AMX)", ws16, torch.bfloat16)):
            marks: list = []
            gemm_search(keys_flat, q_flat, lay, args.chunk, args.k, dt, ws, marks)
            stages[n].append(np.diff(marks).tolist())
    # agreement with faiss (the same candidates are scored: only ties and fp16 rounding)
    f_ids = np.concatenate([ids + s * C
                            for s, (_, ids) in enumerate(results["faiss IVF fp16 codes"])])
    agree = {}
    for n in list(contenders)[1:]:
        g = _rows_of(lay, results[n][1], args.chunk).numpy()
        agree[n] = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(g, f_ids)]))
    base = statistics.median(times["faiss IVF fp16 codes"])
    print(f"{S} memories x {C:,} keys of d {d}, {Qr.shape[1]} queries each, {args.nlist} lists,"
          f" {args.nprobe} probed; {lay['pairs']:,} (query, chunk) pairs in {lay['T']:,} tiles"
          f" of {args.tile} x {args.chunk}; {args.threads} threads, median of {args.repeats}")
    print(f"{'search':28} {'ms':>8} {'vs faiss':>9} {'top-k = faiss':>14}")
    rows = []
    for n in contenders:
        med = statistics.median(times[n])
        a = agree.get(n, 1.0)
        print(f"{n:28} {med * 1e3:8.1f} {base / med:8.2f}x {a:14.3f}")
        row = {"search": n, "s": med, "times": times[n], "speed_vs_faiss": base / med,
               "topk_agreement_with_faiss": a}
        if n in stages:
            st = np.median(np.array(stages[n]), 0) * 1e3
            row["stages_ms"] = dict(zip(STAGES, st.tolist()))
            print("    " + ", ".join(f"{name} {t:.1f}" for name, t in zip(STAGES, st)))
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "memories": S, "capacity": C, "d": d,
                               "queries_per_memory": int(Qr.shape[1]), "pairs": lay["pairs"],
                               "tiles": lay["T"], "chunks": lay["n_chunks"],
                               "max_chunks_per_query": lay["R"], "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
