"""How fast can a product-key layer be here? Its unavoidable parts, timed one by one.

    python benchmarks/bench_pkm_floor.py [--threads 1] [--repeats 7] [--out PATH]

Issue 4 asks for forward+backward of one PKM layer (262,144 slots, d 256, 4 heads,
k_dim 256, top-32, input 4 x 512) within 1.5x a dense FFN 256-1024-256. Any
implementation of the paper's layer at those sizes does at least the following work,
each part here with the fastest single torch op for it:

  query   Linear(256 -> 4 x 256) + BatchNorm, forward and backward
  score   the 2 x 4 half-queries against their 512 sub-keys: one (8, 2048, 128) x
          (8, 128, 512) bmm, forward only (the sub-key gradients are left out)
  top-k   top-32 of each of those 8 x 2048 rows of 512 scores
  values  EmbeddingBag over 4 x 32 value rows per token with per-sample weights,
          forward and backward (sparse gradient), random slots

"floor" = query + score + top-k, the layer without reading a single value; "+ values"
adds the value read. Both are lower bounds: the product step (the 32 x 32 candidate
sums and their top-k), the softmax and every gradient of the scoring are left out.
Repeats are interleaved with the full layer and the FFN; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_pkm import D_FF, D_MODEL, fwd_bwd, inputs, make_pkm
from torch import nn

from memformers.memory.pkm import MaskedBatchNorm1d
from memformers.model.ffn import MLP

HEADS, K_DIM, N_KEYS, TOP_K, BATCH, SEQ = 4, 256, 512, 32, 4, 512  # the sizes
TOKENS = BATCH * SEQ


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def contenders() -> dict:
    sizes = argparse.Namespace(batch=BATCH, seq=SEQ, device="cpu", k_dim=K_DIM)
    x3, mask = inputs(sizes)  # (B, L, D) with its all-real mask
    x = x3.detach().view(TOKENS, D_MODEL).requires_grad_()
    ffn = MLP(D_MODEL, D_FF)
    layer = make_pkm(N_KEYS, True, sizes)  # sparse value gradients, the CPU default
    g = torch.Generator().manual_seed(1)
    query = nn.Linear(D_MODEL, HEADS * K_DIM)
    norm = MaskedBatchNorm1d(HEADS * K_DIM)
    half = K_DIM // 2
    q_halves = torch.randn(2 * HEADS, TOKENS, half, generator=g)  # (2H, T, half)
    sub_keys = torch.randn(2 * HEADS, N_KEYS, half, generator=g)  # (2H, n, half)
    scores = torch.bmm(q_halves, sub_keys.transpose(1, 2))  # (2H, T, n)
    values = nn.EmbeddingBag(N_KEYS ** 2, D_MODEL, mode="sum", sparse=True)
    slots = torch.randint(0, N_KEYS ** 2, (TOKENS, HEADS * TOP_K), generator=g)
    weights = torch.rand(TOKENS, HEADS * TOP_K, generator=g).requires_grad_()

    def query_part():
        query.zero_grad(set_to_none=True)
        x.grad = None
        norm(query(x)).square().mean().backward()

    def value_part():
        values.zero_grad(set_to_none=True)
        weights.grad = None
        values(slots, per_sample_weights=weights).square().mean().backward()

    def score_part():
        torch.bmm(q_halves, sub_keys.transpose(1, 2))

    def topk_part():
        scores.topk(TOP_K, dim=-1)

    return {"dense FFN 256-1024-256": lambda: fwd_bwd(ffn, x3, mask, "cpu"),
            "PKM layer (sparse value grads)": lambda: fwd_bwd(layer, x3, mask, "cpu"),
            "query": query_part, "score": score_part, "top-k": topk_part,
            "values": value_part}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pkm_floor.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fns = contenders()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(args.repeats + 1):  # the first round warms up
        for name, fn in fns.items():
            with torch.set_grad_enabled(name not in ("score", "top-k")):  # forward only
                t = timed(fn)
            if r:
                times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ffn = med["dense FFN 256-1024-256"]
    floor = med["query"] + med["score"] + med["top-k"]
    rows = [(name, med[name]) for name in fns] + [("floor = query + score + top-k", floor),
                                                  ("floor + values", floor + med["values"])]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of "
          f"{args.repeats}\n\n| part | median | vs FFN |\n|---|---:|---:|")
    for name, t in rows:
        print(f"| {name} | {t * 1e3:,.1f} ms | {t / ffn:.2f}x |")
    record = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
              "median_s": med, "floor_s": floor, "floor_plus_values_s": floor + med["values"],
              "floor_vs_ffn": floor / ffn, "floor_plus_values_vs_ffn":
              (floor + med["values"]) / ffn, "layer_vs_ffn":
              med["PKM layer (sparse value grads)"] / ffn}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
