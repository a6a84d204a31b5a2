"""Memorizing Transformers' retrofit experiment (sec. 4.4), scaled down, with memformers.hf.

The paper fine-tuned a model pretrained WITHOUT memory with a kNN memory for
4% of its pretraining steps and closed 85% of the gap to a model trained with
memory from scratch. Here, on a tiny Hugging Face Llama (random init, byte
vocabulary) trained by the memformers trainer on the standard-library corpus:

    (a) pretrain      P steps, no memory                          -> the base
    (b) retrofit      base + kNN memory, F more steps               (add_memory)
    (c) scratch       P steps with kNN memory, then F more steps (same recipe)
    (d) control       base, F more steps without memory

All arms share the schedule (P-step pretraining, then an F-step fine-tune
with its own warm-up), data order and seed. Held-out bits per byte (valid
split, streamed with memory) for every arm, and

    gap closed = (control - retrofit) / (control - scratch)

CPU (about 10 min on 2 cores):
    python scripts/hf_retrofit_experiment.py
GPU, bigger:
    python scripts/hf_retrofit_experiment.py --device cuda --steps 20000 --d-model 512 \
        --layers 8 --segment 512 --batch 32 --capacity 65536 --out runs/hf-retrofit-gpu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from retrofit_common import report, train_stage  # noqa: E402

from memformers.data.corpus import ensure_default_corpus  # noqa: E402
from memformers.hf.configs import tiny_config, write_model_dir  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default="data/stdlib-byte",
                   help="byte corpus (built if it is the default and missing)")
    p.add_argument("--out", default="runs/hf-retrofit")
    p.add_argument("--steps", type=int, default=800, help="P: pretraining steps")
    p.add_argument("--finetune-frac", type=float, default=0.1, help="F = frac * P")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--segment", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--knn-layer", type=int, default=-1, help="default: 3/4 depth")
    p.add_argument("--capacity", type=int, default=2048, help="kNN entries per stream and head")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--eval-tokens", type=int, default=0, help="0 = the whole valid split")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


def run(args, name: str, hf_path: Path, steps: int, lr: float, memory: bool,
        warmup: int) -> dict:
    """Train one stage with the memformers trainer; returns its held-out evaluation."""
    layer = args.knn_layer if args.knn_layer >= 0 else max(0, 3 * args.layers // 4 - 1)
    sets = [f'model.hf_path="{hf_path}"', f'data.corpus="{args.corpus}"',
            f"data.segment_len={args.segment}", f"data.batch_size={args.batch}",
            "data.eval_max_docs=0", f"data.eval_max_tokens={args.eval_tokens}",
            f"train.steps={steps}", f"train.lr={lr}", f"train.warmup_steps={warmup}",
            "train.ckpt_every=0", "train.log_every=50", f"train.seed={args.seed}",
            f"train.device={args.device}"]
    if memory:
        sets += [f"model.knn.layers=[{layer}]", f"model.knn.capacity={args.capacity}"]
    return train_stage(Path(args.out) / name, None, sets, steps=steps, key="bpb",
                       unit="bits/byte", progress=args.progress)


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    if args.corpus == "data/stdlib-byte":
        ensure_default_corpus("byte", progress=args.progress)
    out = Path(args.out)
    P = args.steps
    F = max(1, round(args.finetune_frac * P))
    init = write_model_dir(out / "init", tiny_config(
        "llama", vocab_size=256, d_model=args.d_model, n_layers=args.layers,
        n_heads=args.heads, max_positions=args.segment))
    warm_p, warm_f = max(1, P // 20), max(1, F // 10)
    t0 = time.perf_counter()
    base = run(args, "a-pretrain", init, P, args.lr, False, warm_p)
    retro = run(args, "b-retrofit", out / "a-pretrain" / "hf", F, args.finetune_lr, True, warm_f)
    scratch_p = run(args, "c-scratch-pretrain", init, P, args.lr, True, warm_p)
    scratch = run(args, "c-scratch", out / "c-scratch-pretrain" / "hf", F, args.finetune_lr,
                  False, warm_f)  # the model already has its memory
    control = run(args, "d-control", out / "a-pretrain" / "hf", F, args.finetune_lr, False,
                  warm_f)
    rows = {"pretrained base (no memory, P steps)": base,
            "(b) retrofit: base + kNN, F steps": retro,
            "(c) kNN from scratch, P + F steps": scratch,
            "(d) control: no memory, P + F steps": control,
            "(c) after P steps": scratch_p}
    report(out, args, P, F, rows, "bpb", "bits/byte", time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
