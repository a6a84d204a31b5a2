"""Inference cost of the kNN-LM head on the shipped demo-base, with a full datastore.

Two streams each walk their own long text (held-out documents of the grouped stdlib
corpus, concatenated) until every stream's datastore holds ``--capacity`` real
(hidden state, next token) pairs; then the same next ``--segments`` segments are run
by demo-base alone and by demo-base + kNN-LM, interleaved within each repeat so that
machine noise hits both alike. Prints a table and writes JSON.

    python benchmarks/bench_knnlm.py                       # 65,536 entries, 2 threads
    python benchmarks/bench_knnlm.py --capacity 16384 --threads 1
    python benchmarks/bench_knnlm.py --variant "pq4=model.knnlm.ivf_codes=pq4 \
        model.knnlm.storage_dtype=float32"                  # one more kNN-LM, interleaved
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
from memformers.pretrained import load_shipped_model


def long_streams(corpus: Path, n_tokens: int, B: int) -> torch.Tensor:
    """(B, n_tokens) token ids: held-out documents concatenated, one stream per row."""
    docs = [CorpusSplit.open(corpus, s) for s in ("test", "valid", "train")]
    flat = np.concatenate([d.tokens[: d.offsets[-1]] for d in docs])
    if len(flat) < B * n_tokens:
        raise SystemExit(f"{corpus} holds {len(flat)} tokens; need {B * n_tokens}")
    return torch.from_numpy(flat[: B * n_tokens].astype(np.int64)).view(B, n_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--capacity", type=int, default=65536)
    ap.add_argument("--corpus", default="data/stdlib-byte-grouped")
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--segments", type=int, default=4, help="timed segments per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="more model.knnlm.* settings")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=SETTINGS: another kNN-LM (space-separated settings on top of "
                         "--set), timed interleaved with the others")
    ap.add_argument("--out", default="benchmarks/results/knnlm_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg, base = load_shipped_model("demo-base")
    common = [f"model.knnlm.capacity={args.capacity}", *args.set]
    variants = {"demo-base + kNN-LM": common}
    for v in args.variant:
        name, _, sets = v.partition("=")
        variants[f"demo-base + kNN-LM {name}"] = [*common, *sets.split()]
    models = {"demo-base": base}
    models.update({name: load_shipped_model("demo-base", sets)[1]
                   for name, sets in variants.items()})
    knnlm = models["demo-base + kNN-LM"]
    L, B = cfg.data.segment_len, args.streams
    fill = -(-args.capacity // L) + 1  # segments that fill the datastore
    n_seg = fill + args.segments * args.repeats
    tokens = long_streams(Path(args.corpus), n_seg * L, B)
    seg = lambda i: tokens[:, i * L:(i + 1) * L]  # noqa: E731
    first = torch.ones(B, dtype=torch.bool)
    with torch.no_grad():
        for model in models.values():
            head = model.knnlm
            lam = head.cfg.lam if head is not None else 0.0
            if head is not None:
                head.cfg.lam = 0.0  # filling: store only (no search)
            for i in range(fill):
                model(seg(i), new_doc=first if i == 0 else None)
            if head is not None:
                head.cfg.lam = lam
        held = int(knnlm.knnlm.filled.min())
        times: dict[str, list[float]] = {name: [] for name in models}
        for r in range(args.repeats):
            ids = range(fill + r * args.segments, fill + (r + 1) * args.segments)
            for name, model in models.items():
                t0 = time.perf_counter()
                for i in ids:
                    model(seg(i))
                times[name].append(time.perf_counter() - t0)
    n_tok = B * L * args.segments
    rows = {name: {"seconds": statistics.median(t), "tokens_per_s": n_tok / statistics.median(t),
                   "repeats": t} for name, t in times.items()}
    ratios = {name: statistics.median(b / k for b, k in zip(times["demo-base"], times[name]))
              for name in variants}
    ratio = ratios["demo-base + kNN-LM"]
    print(f"demo-base, {B} streams x {L}-token segments, datastore {held:,} entries per "
          f"stream, {args.threads} threads, median of {args.repeats} x {args.segments} segments")
    print("| model | tokens/s | x demo-base |\n|---|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / rows['demo-base']['tokens_per_s']:.2f} |")
    for name, r in ratios.items():
        print(f"{name}: ratio within repeats (median): {r:.2f}x")
    out = {"capacity": args.capacity, "held": held, "streams": B, "segment_len": L,
           "threads": args.threads, "settings": args.set, "variants": variants,
           "knnlm": vars(knnlm.knnlm.cfg), "rows": rows, "speed_ratio": ratio,
           "speed_ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
