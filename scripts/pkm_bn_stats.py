"""`memformers diagnose pkm-bn` (memformers.diagnostics.pkm_bn), under its old name.

    python scripts/pkm_bn_stats.py RUN_DIR [--split valid] [--max-tokens 0]
"""

import sys

from memformers.cli import main

if __name__ == "__main__":
    sys.exit(main(["diagnose", "pkm-bn", *sys.argv[1:]]))
