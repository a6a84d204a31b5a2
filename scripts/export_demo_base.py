"""Export a pretrained run as the demo's base weights (fp16) with its record.

    python scripts/export_demo_base.py RUN_DIR [--out src/memformers/assets]

Writes demo-base.safetensors (float16), demo-base.json (sha256, steps, tokens,
held-out figures) and demo-base.metrics.jsonl (the training log).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("src/memformers/assets"))
    args = ap.parse_args()
    weights = args.out / "demo-base.safetensors"
    tensors = load_file(str(args.run_dir / "model.safetensors"))
    # The memory gate of a capacity-0 kNN layer never received a gradient: it is not
    # part of the pretrained model, so a fine-tune starts it at model.knn.gate_init.
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".memory.gate")}
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, str(weights),
              metadata={"format": "pt", "dtype": "float16"})
    ev = json.loads((args.run_dir / "eval.json").read_text())
    log = [json.loads(line) for line in open(args.run_dir / "metrics.jsonl")]
    record = {
        "file": weights.name,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "config": "configs/demo/base.toml",
        "command": "bash scripts/gpu_pretrain_base.sh runs/demo-base 230 && "
                   "python scripts/export_demo_base.py runs/demo-base",
        "steps": log[-1]["step"], "tokens": log[-1]["tokens"],
        "train_tokens_per_s": round(log[-1]["tokens_per_s"]),
        "heldout_valid": {"loss": ev["loss"], "bpb": ev["bpb"], "tokens": ev["tokens"],
                          "by_position": {k: round(v["loss"], 4)
                                          for k, v in ev["by_position"].items()}},
    }
    (args.out / "demo-base.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.copy(args.run_dir / "metrics.jsonl", args.out / "demo-base.metrics.jsonl")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
