"""Compare memory mechanisms on equal terms: ``memformers compare CONFIG``.

  spec.py        the compare config: its tables as dataclasses, loading, variant run configs
  harness.py     running (training / reusing) every variant, with cached evaluation parts
  evaluation.py  every evaluation of one trained model (shared with ``memformers eval``)
  report.py   report.md (one table + a section per extra), results.json, print_table
  plots.py    PNG plots (loss by position, memory sweep, passkey, loss difference, gates,
              sorting accuracy by length)
  cli.py      the ``compare`` subcommand
"""

from memformers.compare.harness import run_compare, run_variant
from memformers.compare.report import print_table, write_report
from memformers.compare.spec import (
    CompareConfig,
    EvalSpec,
    VariantSpec,
    compare_config_from_dict,
    load_compare_config,
)

__all__ = [
    "CompareConfig",
    "EvalSpec",
    "VariantSpec",
    "compare_config_from_dict",
    "load_compare_config",
    "print_table",
    "run_compare",
    "run_variant",
    "write_report",
]
