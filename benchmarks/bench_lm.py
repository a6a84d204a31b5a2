"""Training and inference throughput and peak memory of model presets.

    python benchmarks/bench_lm.py [--presets baseline,xl] [--steps 5] [--device cpu]

Benchmark config (issue 2): 6 layers, d_model 256, 8 heads x 32, segment 512,
2 streams, byte vocabulary. Extra presets add memories with --set style
overrides, e.g. ``--preset knn65k=model.xl_cache=true,model.knn.layers=[4]``.
Prints a table and writes JSON (medians over the timed steps).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from memformers.config import load_config
from memformers.memory.state import state_bytes_per_stream
from memformers.model import MemformerLM, lm_loss
from memformers.train.optim import build_optimizers

BASE = ["model.n_layers=6", "model.d_model=256", "model.n_heads=8", "model.head_dim=32",
        "model.d_ff=1024", "model.vocab_size=256", "data.segment_len=512", "data.batch_size=2"]
PRESETS = {
    "baseline": [],
    "xl": ["model.xl_cache=true"],
    "xl+knn65k": ["model.xl_cache=true", "model.knn.layers=[4]", "model.knn.capacity=65536"],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, opts, seq: torch.Tensor, ctx=None) -> None:
    """One optimiser step on a (B, L + 1) batch of one segment per stream."""
    with ctx or nullcontext():
        loss = lm_loss(model(seq[:, :-1]), seq[:, 1:])
    loss.backward()
    for o in opts:
        o.step()
        o.zero_grad(set_to_none=True)
    model.detach_state()


def bench(name: str, overrides: list[str], steps: int, warmup: int, device: torch.device,
          fill_memory: bool) -> dict:
    cfg = load_config(None, BASE + overrides)
    torch.manual_seed(0)
    model = MemformerLM(cfg.model).to(device)
    opts = build_optimizers(model, cfg.train)
    B, L = cfg.data.batch_size, cfg.data.segment_len
    gen = torch.Generator().manual_seed(0)
    batch = lambda: torch.randint(0, 256, (B, L + 1), generator=gen).to(device)
    model.allocate_state(B, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    ctx = autocast or torch.autocast("cpu", enabled=False)
    if fill_memory and cfg.model.knn.layers:  # time a full memory, as in a long document
        with torch.no_grad(), ctx:
            for _ in range(cfg.model.knn.capacity // L):
                model(batch()[:, :-1])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_times, infer_times = [], []
    for i in range(warmup + steps):
        seq = batch()
        _sync(device)
        t0 = time.perf_counter()
        train_step(model, opts, seq, ctx)
        _sync(device)
        if i >= warmup:
            train_times.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad(), ctx:
        for i in range(warmup + steps):
            seq = batch()
            _sync(device)
            t0 = time.perf_counter()
            model(seq[:, :-1])
            _sync(device)
            if i >= warmup:
                infer_times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    tokens = B * L
    return {
        "preset": name, "params": model.num_parameters(),
        "train_tokens_per_s": tokens / statistics.median(train_times),
        "infer_tokens_per_s": tokens / statistics.median(infer_times),
        "peak_bytes": peak, "state_bytes_per_stream": state_bytes_per_stream(model),
        "device": str(device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="baseline,xl")
    ap.add_argument("--preset", action="append", default=[], metavar="NAME=K=V,K=V")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-fill", action="store_true", help="do not fill memories before timing")
    ap.add_argument("--out", default="benchmarks/results/lm.json")
    args = ap.parse_args()
    presets = {n: PRESETS[n] for n in args.presets.split(",") if n}
    for p in args.preset:
        name, _, sets = p.partition("=")
        presets[name] = [s for s in sets.split(",") if s]
    device = torch.device(args.device)
    rows = []
    for name, ov in presets.items():
        rows.append(bench(name, ov, args.steps, args.warmup, device, not args.no_fill))
        r = rows[-1]
        print(f"{name:>12}: train {r['train_tokens_per_s']:8,.0f} tok/s  infer "
              f"{r['infer_tokens_per_s']:9,.0f} tok/s  peak {r['peak_bytes'] / 2**20:7.0f} MiB",
              file=sys.stderr, flush=True)
    print(f"| preset | params | train tok/s | infer tok/s | peak MiB | state/stream | "
          f"({device}) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {r['train_tokens_per_s']:,.0f} | "
              f"{r['infer_tokens_per_s']:,.0f} | {r['peak_bytes'] / 2**20:,.0f} | "
              f"{r['state_bytes_per_stream'] / 2**20:,.2f} MiB | |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
