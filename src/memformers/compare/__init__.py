"""Compare memory mechanisms on equal terms: ``memformers compare CONFIG``.

  harness.py  compare-config loading/validation, running variants with caching
  report.py   report.md (one table + a section per extra), results.json, print_table
  plots.py    PNG plots (loss by position, memory sweep, passkey, loss difference, gates,
              sorting accuracy by length)
  cli.py      the ``compare`` subcommand
"""

from memformers.compare.harness import (
    CompareConfig,
    EvalSpec,
    VariantSpec,
    compare_config_from_dict,
    load_compare_config,
    run_compare,
    run_variant,
    train_eval_sorting,
)
from memformers.compare.report import print_table, write_report

__all__ = [
    "CompareConfig",
    "EvalSpec",
    "VariantSpec",
    "compare_config_from_dict",
    "load_compare_config",
    "print_table",
    "run_compare",
    "run_variant",
    "train_eval_sorting",
    "write_report",
]
