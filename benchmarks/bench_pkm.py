"""Product-key memory layer vs a dense FFN, and dense vs sparse value gradients.

    python benchmarks/bench_pkm.py                 # 262K slots, < 3 min on 2 CPU cores
    python benchmarks/bench_pkm.py --full          # also 1M slots (needs ~6 GB for dense Adam)
    python benchmarks/bench_pkm.py --device cuda

1. forward+backward of one layer on (4, 512, 256) input: PKM (n=512 -> 262,144
   slots, 4 heads, k=32, k_dim from --k-dim) with dense / sparse value grads,
   against the FFN it replaces (256 -> 1024 -> 256, GELU). Repeats are
   interleaved so machine load hits every variant alike; medians reported.
2. one training step (fwd + bwd + optimizer: Adam on values vs SparseAdam, AdamW
   on the rest) per slot count, each in a fresh subprocess so peak memory is its
   own: peak RSS growth over the RSS after building the layer (CPU) or
   torch.cuda.max_memory_allocated (CUDA).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from memformers.config import TrainConfig
from memformers.memory.configs import PKMConfig
from memformers.memory.pkm import ProductKeyMemory
from memformers.model.ffn import MLP
from memformers.train.optim import build_optimizers

D_MODEL, D_FF = 256, 1024


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_pkm(n_keys: int, sparse: bool, args) -> ProductKeyMemory:
    cfg = PKMConfig(layers=[0], n_keys=n_keys, heads=4, k_dim=args.k_dim, top_k=32,
                    sparse=sparse)
    return ProductKeyMemory(cfg, d_model=D_MODEL, shared_modules={}).to(args.device)


def inputs(args) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.seq, D_MODEL, generator=g).to(args.device)
    return x.requires_grad_(), torch.ones(args.batch, args.seq, dtype=torch.bool,
                                          device=args.device)


def fwd_bwd(module, x, mask, device) -> float:
    module.zero_grad(set_to_none=True)
    x.grad = None
    sync(device)
    t = time.perf_counter()
    module(x, mask).square().mean().backward()
    sync(device)
    return time.perf_counter() - t


def layer_timings(args) -> dict:
    torch.manual_seed(0)
    x, mask = inputs(args)
    variants = {
        "ffn_dense_256_1024": MLP(D_MODEL, D_FF).to(args.device),
        "pkm_262k_dense_grad": make_pkm(512, False, args),
        "pkm_262k_sparse_grad": make_pkm(512, True, args),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.warmup):
        for m in variants.values():
            fwd_bwd(m, x, mask, args.device)
    for _ in range(args.repeats):  # interleaved
        for name, m in variants.items():
            times[name].append(fwd_bwd(m, x, mask, args.device))
    with torch.no_grad():
        fwd: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.repeats):
            for name, m in variants.items():
                sync(args.device)
                t = time.perf_counter()
                m(x, mask)
                sync(args.device)
                fwd[name].append(time.perf_counter() - t)
    base = statistics.median(times["ffn_dense_256_1024"])
    return {name: {"fwd_bwd_ms": 1e3 * statistics.median(ts),
                   "fwd_ms": 1e3 * statistics.median(fwd[name]),
                   "vs_ffn": statistics.median(ts) / base}
            for name, ts in times.items()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def step_child(args) -> dict:
    """One config in this (fresh) process: median step time and peak memory."""
    torch.manual_seed(0)
    pkm = make_pkm(args.child_n, args.child_sparse, args)
    x, mask = inputs(args)
    x.requires_grad_(False)
    opts = build_optimizers(pkm, TrainConfig(lr=1e-3, weight_decay=0.1))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    times = []
    for i in range(args.warmup + args.repeats):
        sync(args.device)
        t = time.perf_counter()
        for o in opts:
            o.zero_grad(set_to_none=True)
        pkm(x, mask).square().mean().backward()
        for o in opts:
            o.step()
        sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:  # ru_maxrss is KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"slots": args.child_n ** 2, "sparse": args.child_sparse,
            "step_ms": 1e3 * statistics.median(times), "peak_extra_mib": peak / 2 ** 20,
            "table_mib": pkm.values.weight.numel() * 4 / 2 ** 20}


def step_timings(args) -> list[dict]:
    rows = []
    for n in [512] + ([1024] if args.full else []):
        for sparse in (False, True):
            cmd = [sys.executable, __file__, "--child-n", str(n), "--device", args.device,
                   "--repeats", str(args.step_repeats), "--warmup", "1",
                   "--batch", str(args.batch), "--seq", str(args.seq),
                   "--k-dim", str(args.k_dim), "--threads", str(torch.get_num_threads())]
            if sparse:
                cmd.append("--child-sparse")
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/pkm.json")
    ap.add_argument("--full", action="store_true", help="also 1M slots (n_keys=1024)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--step-repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--k-dim", type=int, default=PKMConfig.k_dim)
    ap.add_argument("--child-n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child-sparse", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_n:
        print(json.dumps(step_child(args)))
        return

    layer = layer_timings(args)
    print(f"input ({args.batch}, {args.seq}, {D_MODEL}), k_dim {args.k_dim}, heads 4, k 32, "
          f"device {args.device}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    print(f"{'layer':<24}{'fwd ms':>10}{'fwd+bwd ms':>12}{'vs FFN':>8}")
    for name, r in layer.items():
        print(f"{name:<24}{r['fwd_ms']:>10.1f}{r['fwd_bwd_ms']:>12.1f}{r['vs_ffn']:>8.2f}")
    steps = step_timings(args)
    print(f"\n{'slots':>9} {'grads':<7}{'step ms':>10}{'peak extra MiB':>16}{'table MiB':>11}")
    for r in steps:
        print(f"{r['slots']:>9} {'sparse' if r['sparse'] else 'dense':<7}{r['step_ms']:>10.1f}"
              f"{r['peak_extra_mib']:>16.0f}{r['table_mib']:>11.0f}")
    result = {"layer": layer, "train_step": steps,
              "setup": {"batch": args.batch, "seq": args.seq, "d_model": D_MODEL, "d_ff": D_FF,
                        "k_dim": args.k_dim, "heads": 4, "top_k": 32, "device": args.device,
                        "threads": torch.get_num_threads(), "repeats": args.repeats,
                        "torch": torch.__version__, "machine": platform.machine()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
