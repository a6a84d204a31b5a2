"""One table and plot from the runs of scripts/gpu_pkm_usage.sh.

    python scripts/collect_pkm_usage.py benchmarks/results/gpu/pkm_usage/*/*/ \
        --out benchmarks/results/gpu/pkm_usage_summary

Each directory is one `memformers train` run (config.json, metrics.jsonl, and the
eval-valid.json / eval-test.json of `memformers eval`); it is named PARENT/NAME in the
table (e.g. seed1/pkm). Reads the held-out curve ("eval" rows of metrics.jsonl: loss on
the first 60K held-out tokens, slot usage of every product-key layer) and the final
full-split evaluations. Writes OUT.json, OUT.md and OUT.png (usage vs step).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def usage_of(record: dict) -> dict | None:
    """The first product-key layer's usage of an evaluation record (None: no PKM)."""
    layers = record.get("pkm_usage") or {}
    return next(iter(layers.values()), None)


def read_run(directory: Path) -> dict:
    curve = []
    for line in (directory / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval" in row:
            u = usage_of(row["eval"])
            curve.append({"step": row["step"], "loss": row["eval"]["loss"],
                          "used": u["used"] if u else None})
    final = {}
    for split in ("valid", "test"):
        path = directory / f"eval-{split}.json"
        if path.is_file():
            ev = json.loads(path.read_text())
            u = usage_of(ev)
            final[split] = {"loss": ev["loss"], "tokens": ev["tokens"]}
            if u:
                final[split] |= {k: u[k] for k in ("used", "kl_uniform", "slots_50", "slots_90")}
    cfg = json.loads((directory / "config.json").read_text())
    return {"name": f"{directory.parent.name}/{directory.name}", "seed": cfg["train"]["seed"],
            "steps": cfg["train"]["steps"], "curve": curve, "final": final}


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(runs: list[dict]) -> str:
    lines = ["| run | valid loss | test loss | usage valid | usage test | KL test | "
             "slots with 50% / 90% (test) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        v, t = r["final"].get("valid", {}), r["final"].get("test", {})
        lines.append(
            f"| {r['name']} | {fmt(v.get('loss'), '.4f')} | {fmt(t.get('loss'), '.4f')} | "
            f"{pct(v.get('used'))} | {pct(t.get('used'))} | "
            f"{fmt(t.get('kl_uniform'), '.3f')} | "
            f"{fmt(t.get('slots_50'), ',')} / {fmt(t.get('slots_90'), ',')} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        pts = [(p["step"], 100 * p["used"]) for p in r["curve"] if p["used"] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=r["name"])
    ax.axhline(80, color="grey", linestyle="--", linewidth=1, label="target 80%")
    ax.set_xlabel("training step (32 x 512 tokens each)")
    ax.set_ylabel("slots used on 60K held-out tokens (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="output prefix")
    args = ap.parse_args()
    for d in args.runs:
        if not (d / "metrics.jsonl").is_file() or not (d / "config.json").is_file():
            raise SystemExit(f"error: {d} is not a `memformers train` run directory "
                             f"(no metrics.jsonl / config.json)")
    runs = [read_run(d) for d in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(runs, indent=2))
    md = table(runs)
    args.out.with_suffix(".md").write_text(md + "\n")
    plot(runs, args.out.with_suffix(".png"))
    print(md)


if __name__ == "__main__":
    main()
