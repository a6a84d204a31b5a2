"""The ``memformers compare CONFIG`` command: train variants on equal terms, write a report.

    memformers compare configs/compare/cpu-small.toml [--set key=value ...]
        [--only NAME,NAME] [--out DIR] [--no-progress]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_compare_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``compare`` on the main CLI's subparsers."""
    c = subparsers.add_parser(
        "compare", help="train and evaluate model variants on equal terms, write a report",
        description="Train every [[variant]] of a compare config with the same data, tokens, "
                    "seed and schedule (finished runs are reused), evaluate each with the same "
                    "harness and write report.md, results.json and PNG plots.")
    c.add_argument("config", help="compare config TOML (see configs/compare/)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config value for every variant, e.g. train.steps=50")
    c.add_argument("--only", metavar="NAME,NAME",
                   help="run only these variants (others are reported if already cached)")
    c.add_argument("--out", help="report directory (default reports/<name>)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compare)
    return c


def cmd_compare(args: argparse.Namespace) -> int:
    from memformers.compare.harness import Stopped, run_compare
    from memformers.compare.report import print_table, write_report
    from memformers.compare.spec import load_compare_config

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    cc = load_compare_config(args.config, args.set, only)
    out = Path(args.out) if args.out else Path("reports") / cc.name
    try:
        results = run_compare(cc, out, only=only, progress=not args.no_progress)
    except Stopped as e:
        print(str(e))
        return 143
    report = write_report(results, out)
    print()
    print(print_table(results))
    for note in results["notes"]:
        print(f"note: {note}")
    print(f"\nreport written to {report}")
    return 0
