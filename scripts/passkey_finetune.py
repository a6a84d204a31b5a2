"""Teach a segment-recurrent model to retrieve a passkey, then measure it far beyond training.

Fine-tunes on passkey prompts (tasks/passkey.py) with the loss on the answer tokens
only: every earlier segment is fed without gradient (it only fills the XL cache and
the long-term memory, whose contents are stop-gradient anyway), the last segment
holds the question and is trained. Training lengths stay short (default <= 4K
tokens); evaluation goes to 16K and 64K, where only a long-term memory can hold the
needle. Run it twice -- with and without the memory -- for the control:

    python scripts/passkey_finetune.py --out runs/pk-knn --set model.knn.capacity=65536
    python scripts/passkey_finetune.py --out runs/pk-xl                      # capacity 0
    python scripts/passkey_finetune.py --out runs/pk-infini --grad-segments 4 \
        --set "model.infini.layers=[3]"      # Infini-attention (top layer)

``--steps 0`` only evaluates (e.g. a trained model with a larger memory):

    python scripts/passkey_finetune.py --out runs/pk-256k --init runs/pk-knn/model.safetensors \
        --steps 0 --set model.knn.capacity=262144 --eval-lengths 262144 --samples 4

Writes OUT/passkey.json and its heatmap OUT/passkey.png (scripts/plot_passkey.py
renders one from any stored passkey JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from memformers.config import load_config
from memformers.data.tokenizer import ByteTokenizer
from memformers.evaluate.passkey import evaluate_passkey, passkey_table, plot_passkey_file
from memformers.model import MemformerLM
from memformers.pretrained import resolve_weights
from memformers.tasks.passkey import passkey_training_batch
from memformers.train.checkpoint import load_model_weights, save_model
from memformers.train.optim import build_optimizers, set_lr
from memformers.train.trainer import autocast_for, gate_report, resolve_device


def answer_loss(model, tokens: torch.Tensor, targets: torch.Tensor, seg: int, amp,
                grad_segments: int = 1) -> torch.Tensor:
    """Feed (B, T) tokens segment by segment; cross-entropy on the labelled positions.

    The last ``grad_segments`` segments run with gradient, so a memory whose state is
    differentiable (Infini-attention) is trained through its writes (BPTT); earlier
    segments only fill the state.
    """
    B, T = tokens.shape
    model.allocate_state(B, tokens.device)
    first = torch.ones(B, dtype=torch.bool, device=tokens.device)
    cont = torch.zeros_like(first)
    n = T // seg
    n_free = max(0, n - grad_segments)
    with torch.no_grad(), amp:
        for s in range(n_free):
            model(tokens[:, s * seg:(s + 1) * seg], new_doc=first if s == 0 else cont)
    losses = []
    for s in range(n_free, n):
        labels = targets[:, s * seg:(s + 1) * seg]
        with amp:
            logits = model(tokens[:, s * seg:(s + 1) * seg], new_doc=first if s == 0 else cont)
        if (labels != -100).any():
            losses.append(torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                reduction="sum"))
    return torch.stack(losses).sum() / (targets != -100).sum()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo/base.toml")
    p.add_argument("--init", default="demo-base", help="weights to start from")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1500, help="0: evaluate only")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lengths", default="1024,2048,4096", help="training lengths (tokens)")
    p.add_argument("--eval-lengths", default="4096,16384,65536")
    p.add_argument("--eval-depths", default="0.1,0.5,0.9")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grad-segments", type=int, default=1,
                   help="last segments trained with gradient (BPTT through the memory state)")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also write OUT/model.safetensors every N steps (atomic)")
    p.add_argument("--progress", action="store_true", help="progress bar while evaluating")
    args = p.parse_args()

    cfg = load_config(args.config, args.set + [f"train.lr={args.lr}",
                                               f"train.steps={max(1, args.steps)}",
                                               f"train.warmup_steps={max(1, args.steps // 10)}"])
    dev = resolve_device(cfg.train.device)
    torch.manual_seed(args.seed)
    model = MemformerLM(cfg.model).to(dev)
    load_model_weights(model, resolve_weights(args.init), strict=False)
    opts = build_optimizers(model, cfg.train)
    amp = autocast_for(dev, cfg.train.precision)
    tok, seg = ByteTokenizer(), cfg.data.segment_len
    lengths = [int(x) for x in args.lengths.split(",")]
    if any(n % seg for n in lengths):
        raise SystemExit(f"error: training lengths must be multiples of segment_len {seg}")
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = []
    start = time.time()
    model.train()
    for step in range(args.steps):
        set_lr(opts, step, cfg.train)
        n = int(rng.choice(lengths))
        toks, tgts = (torch.as_tensor(a, device=dev)
                      for a in passkey_training_batch(tok, args.batch, n, rng))
        loss = answer_loss(model, toks, tgts, seg, amp, args.grad_segments)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        for o in opts:
            o.step()
        if step % 25 == 0 or step == args.steps - 1:
            rec = {"step": step, "length": n, "answer_loss": round(loss.item(), 4),
                   "seconds": round(time.time() - start, 1)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
        if args.save_every and (step + 1) % args.save_every == 0:  # a killed run keeps these
            save_model(model, out / "model.safetensors")
    if args.steps:
        save_model(model, out / "model.safetensors")

    res = {"train_log": log, "gates": gate_report(model), "config_sets": args.set}
    model.eval()
    with amp:
        r = evaluate_passkey(model, tok, [int(x) for x in args.eval_lengths.split(",")],
                             [float(x) for x in args.eval_depths.split(",")], segment_len=seg,
                             samples_per_cell=args.samples, device=dev, progress=args.progress,
                             seed=10_000 + args.seed)  # prompts never seen in training
    res["passkey"] = r
    print(passkey_table(r), flush=True)
    (out / "passkey.json").write_text(json.dumps(res, indent=2))
    print(f"heatmap: {plot_passkey_file(out / 'passkey.json')}")


if __name__ == "__main__":
    main()
