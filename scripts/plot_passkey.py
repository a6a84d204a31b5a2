"""Render passkey heatmaps (length x depth accuracy) from stored passkey JSON files.

    python scripts/plot_passkey.py benchmarks/results/gpu/passkey_*.json

Each PNG is written next to its JSON, with the same name.
"""

from __future__ import annotations

import argparse
import sys

from memformers.errors import MemformersError
from memformers.evaluate.passkey import plot_passkey_file


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", metavar="FILE.json")
    args = p.parse_args()
    try:
        for f in args.files:
            print(f"written {plot_passkey_file(f)}")
    except MemformersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
