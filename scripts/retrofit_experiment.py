"""Memorizing Transformers' retrofit experiment (sec. 4.4) with memformers' own model.

The paper fine-tuned a model pretrained WITHOUT memory with a kNN memory for 4% of
its pretraining steps and closed 85% of the gap to a model trained with memory from
scratch. scripts/hf_retrofit_experiment.py does this for a Hugging Face Llama with the
paper's gated memory, where memory from scratch never beat its control. This script
does it for the memformers Transformer-XL with the memory the demo uses (issue 16: read
in layers 2 and 3, layer 3 unnormalised, retrieved pairs joining the local softmax):

    (a) pretrain      P steps, no memory                           -> the base
    (b) retrofit      base + kNN memory, F more steps
    (c) scratch       P steps with the kNN memory, then F more steps
    (d) control       base, F more steps without memory

All arms share the architecture of configs/demo/base.toml, the data order and the seed;
the fine-tune stages share their schedule. Held-out loss (test split, streamed with
memory) for every arm, and

    gap closed = (control - retrofit) / (control - scratch)

CPU (about 40 min on 2 cores):
    python scripts/retrofit_experiment.py --out runs/retrofit
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from retrofit_common import report, train_stage  # noqa: E402

# The demo's memory (configs/compare/cpu-small.toml, variant xl+knn), capacity aside.
MEMORY = ["model.knn.layers=[2, 3]", "model.knn.normalize=[2]", "model.knn.combine='joint'",
          "model.knn.gate_init=-3.0"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo/base.toml",
                   help="architecture and corpus (the demo base's)")
    p.add_argument("--out", default="runs/retrofit")
    p.add_argument("--steps", type=int, default=800, help="P: pretraining steps")
    p.add_argument("--finetune-frac", type=float, default=0.1, help="F = frac * P")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--capacity", type=int, default=16384, help="kNN entries per stream and head")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--eval-docs", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=40000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="more config overrides")
    p.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


def run(args, name: str, init: Path | None, steps: int, lr: float, memory: bool,
        warmup: int) -> dict:
    """Train one stage with the memformers trainer; returns its held-out evaluation."""
    sets = [f"data.batch_size={args.batch}", "data.eval_split='test'",
            f"data.eval_max_docs={args.eval_docs}", f"data.eval_max_tokens={args.eval_tokens}",
            f"train.steps={steps}", f"train.lr={lr}", f"train.warmup_steps={warmup}",
            "train.ckpt_every=0", "train.log_every=50", f"train.seed={args.seed}",
            "train.init_from=" + (f"'{init}'" if init else "''"), *args.set]
    if memory:
        sets += [*MEMORY, f"model.knn.capacity={args.capacity}"]
    return train_stage(Path(args.out) / name, args.config, sets, steps=steps, key="loss",
                       unit="nats/token", progress=args.progress)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    P = args.steps
    F = max(1, round(args.finetune_frac * P))
    warm_p, warm_f = max(1, P // 20), max(1, F // 10)
    t0 = time.perf_counter()
    base = run(args, "a-pretrain", None, P, args.lr, False, warm_p)
    weights = out / "a-pretrain" / "model.safetensors"
    retro = run(args, "b-retrofit", weights, F, args.finetune_lr, True, warm_f)
    control = run(args, "d-control", weights, F, args.finetune_lr, False, warm_f)
    scratch_p = run(args, "c-scratch-pretrain", None, P, args.lr, True, warm_p)
    scratch = run(args, "c-scratch", out / "c-scratch-pretrain" / "model.safetensors", F,
                  args.finetune_lr, True, warm_f)
    rows = {"(a) pretrained base, no memory, P steps": base,
            "(b) retrofit: base + kNN, F steps": retro,
            "(c) kNN from scratch, P + F steps": scratch,
            "(d) control: no memory, P + F steps": control,
            "(c) after P steps": scratch_p}
    report(out, args, P, F, rows, "loss", "nats/token", time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
