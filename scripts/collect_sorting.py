"""One table and plot from several `memformers sorting` runs (one directory per variant).

    python scripts/collect_sorting.py runs/sort-xl-* runs/sort-continuous-sticky-* \
        --step 500 --out benchmarks/results/gpu/sorting_500steps

Each directory holds the results.json of `memformers sorting --eval-every N`; its variant
name is the directory name without a leading "sort-" and a trailing "-<length>". With
--step, every run is read at that step of its learning curve (equal steps for all, also
for a run stopped before its last step); a run that never got there is left out.
Writes OUT.json, OUT.md (accuracy by variant and length), OUT.png (accuracy vs T) and
OUT_curves.png (accuracy vs step at every length).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from memformers.compare.plots import plot_sorting, plot_sorting_curves


def runs_of(directory: Path, step: int | None) -> dict[str, dict]:
    """{length: {"accuracy", "loss", "step", "curve"}} of one results.json."""
    record = json.loads((directory / "results.json").read_text())
    curves = {t: r.get("curve", [r]) for t, r in record["sorting"].items()}
    if "in_progress" in record:  # stopped early: the curve so far
        curves[str(record["in_progress"]["length"])] = record["in_progress"]["curve"]
    out = {}
    for t, curve in curves.items():
        points = [p for p in curve if step is None or p.get("step") == step]
        if points:
            p = points[-1]
            out[t] = {"accuracy": p["accuracy"], "loss": p["loss"],
                      "step": p.get("step", record["steps"]), "curve": curve}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--step", type=int, help="read every curve at this step")
    ap.add_argument("--out", required=True, help="output path without extension")
    args = ap.parse_args()

    variants: dict[str, dict] = {}
    for d in args.dirs:
        if not (d / "results.json").is_file():
            raise SystemExit(f"error: {d} holds no results.json of `memformers sorting`")
        name = re.sub(r"-\d+$", "", d.name.removeprefix("sort-"))
        variants.setdefault(name, {}).update(runs_of(d, args.step))
    variants = {n: r for n, r in variants.items() if r}  # none reached --step
    lengths = sorted({int(t) for v in variants.values() for t in v})
    rows = ["| variant | " + " | ".join(f"T={t}" for t in lengths) + " |",
            "|---|" + "---:|" * len(lengths)]
    for name, res in variants.items():
        cells = [f"{res[str(t)]['accuracy']:.1%}" if str(t) in res else "-" for t in lengths]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    print(table)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"step": args.step, "variants": [{"name": n, "sorting": r}
                                              for n, r in variants.items()]}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    plot_sorting(record, out.with_suffix(".png"))
    plot_sorting_curves(record, Path(f"{out}_curves.png"))


if __name__ == "__main__":
    main()
