"""Sweep the Infini-attention capacity experiment (memformers.diagnostics.infini_capacity).

    python scripts/infini_capacity.py --out benchmarks/results/infini_capacity.json

Read-back accuracy of one trained compressive-memory head against the number of stored
tokens N, for d 32 and 128, the linear and delta rules, and the learned feature map, the
write gate and no normaliser; a plot next to the JSON.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from memformers.diagnostics.infini_capacity import CapacityConfig, run_capacity

VARIANTS = {
    "linear": {"update": "linear"},
    "delta": {"update": "delta"},
    "delta + learned feature": {"update": "delta", "feature": "learned"},
    "delta + write gate": {"update": "delta", "write_gate": True},
    "linear + write gate": {"update": "linear", "write_gate": True},
    "delta, no normaliser": {"update": "delta", "normalise": False},
}


def one(job):
    torch.set_num_threads(1)
    name, kw = job
    return {"variant": name, **run_capacity(CapacityConfig(**kw))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", default="64,256,1024")
    p.add_argument("--d", default="32,128")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/infini_capacity.json")
    args = p.parse_args()
    jobs = [(name, {**kw, "n": n, "d": d, "steps": args.steps})
            for d in (int(x) for x in args.d.split(","))
            for name, kw in VARIANTS.items()
            for n in (int(x) for x in args.n.split(","))]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, jobs))
    print("| d | variant | " + " | ".join(f"N={n}" for n in args.n.split(",")) + " |")
    print("|---|---|" + "---:|" * len(args.n.split(",")))
    for d in sorted({r["d"] for r in rows}):
        for name in VARIANTS:
            accs = [f"{r['accuracy']:.2f}" for r in rows if r["d"] == d and r["variant"] == name]
            print(f"| {d} | {name} | " + " | ".join(accs) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    for i, d in enumerate(sorted({r["d"] for r in rows})):
        ax = fig.add_subplot(1, 2, i + 1)
        for name in VARIANTS:
            pts = sorted((r["n"], r["accuracy"]) for r in rows
                         if r["d"] == d and r["variant"] == name)
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.axhline(rows[0]["chance"], color="grey", linestyle=":", label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens stored (N)")
        ax.set_ylabel("read-back accuracy")
        ax.set_title(f"one Infini head, d = {d}")
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
