"""The table and record shared by the two retrofit experiments (scripts/*retrofit_experiment.py).

    gap closed = (control - retrofit) / (control - scratch)
"""

from __future__ import annotations

import json
from pathlib import Path


def report(out: Path, args, P: int, F: int, rows: dict[str, dict], key: str, unit: str,
           seconds: float) -> dict:
    """``rows``: {label: evaluation}; the labels of the retrofit, scratch and control arms
    start with "(b)", "(c) kNN" and "(d)". Writes OUT/results.json, prints the table."""
    pick = {tag: next(v for k, v in rows.items() if k.startswith(tag))
            for tag in ("(b)", "(c) kNN", "(d)")}
    control, retro, scratch = pick["(d)"][key], pick["(b)"][key], pick["(c) kNN"][key]
    gap = control - scratch
    closed = (control - retro) / gap if gap > 0 else None
    result = {"P": P, "F": F, "finetune_fraction": F / P, "args": vars(args),
              key: {k: v[key] for k, v in rows.items()},
              f"{key}_by_position": {k: {b: r[key] for b, r in v["by_position"].items()}
                                     for k, v in rows.items()},
              "gap": gap, "gap_closed": closed, "total_seconds": seconds}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    first = next(iter(rows.values()))
    buckets = list(first["by_position"])
    print(f"\nP = {P} pretraining steps, F = {F} fine-tuning steps ({F / P:.0%}); held-out "
          f"{unit} ({first['tokens']:,} tokens)")
    print(f"{'model':<42}{'all':>8}" + "".join(f"{b:>10}" for b in buckets))
    for k, v in rows.items():
        print(f"{k:<42}{v[key]:>8.4f}" + "".join(
            f"{v['by_position'].get(b, {}).get(key, float('nan')):>10.4f}" for b in buckets))
    if closed is None:
        print(f"gap closed: undefined -- memory from scratch did not beat the control "
              f"(gap {gap:+.4f} {unit})")
    else:
        print(f"gap closed by the retrofit: {closed:.0%} (gap {gap:.4f} {unit})")
    print(f"written {out / 'results.json'}")
    return result
