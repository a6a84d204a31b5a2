"""What the two retrofit experiments (scripts/*retrofit_experiment.py) share: training one
stage with the memformers trainer, and the table and record of

    gap closed = (control - retrofit) / (control - scratch)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from memformers.config import load_config
from memformers.train.trainer import Trainer


def train_stage(run_dir: Path, config: str | None, sets: list[str], *, steps: int, key: str,
                unit: str, progress: bool = False) -> dict:
    """Train one stage (config file + ``sets``) in ``run_dir`` and return its held-out
    evaluation; a stage that finished earlier (its eval.json exists) is reused."""
    if (run_dir / "eval.json").is_file():
        return json.loads((run_dir / "eval.json").read_text())
    t0 = time.perf_counter()
    trainer = Trainer(load_config(config, sets), run_dir, progress=progress)
    print(f"[{run_dir.name}] {trainer.describe()}", flush=True)
    trainer.run()
    ev = trainer.evaluate()
    ev["train_seconds"] = time.perf_counter() - t0
    (run_dir / "eval.json").write_text(json.dumps(ev, indent=2))
    print(f"[{run_dir.name}] {steps} steps, held-out {ev[key]:.4f} {unit} "
          f"({ev['train_seconds']:.0f} s)", flush=True)
    return ev


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
