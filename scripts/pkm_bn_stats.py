"""Held-out loss of a product-key model with its query BatchNorm in two modes:
running statistics (what evaluation uses) and each evaluation batch's own statistics
(real tokens only). A large gap would mean the running statistics do not describe the
held-out queries, i.e. BatchNorm's train/eval mismatch rather than the memory.

    python scripts/pkm_bn_stats.py RUN_DIR [--split valid] [--max-tokens 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memformers.cli import load_trained_model
from memformers.data.corpus import CorpusSplit
from memformers.errors import MemformersError
from memformers.evaluate.lm import evaluate_lm
from memformers.memory import pkm


def batch_statistics(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MaskedBatchNorm1d.forward in eval, normalising with this batch's real tokens."""
    mean, var, _ = self.masked_moments(x, mask)
    return self.normalise(x, mean, var)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--split", default="valid")
    ap.add_argument("--max-tokens", type=int, default=0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    try:
        cfg, model, tok = load_trained_model(args.run_dir, [], args.device)
    except MemformersError as e:
        raise SystemExit(f"error: {e}") from None
    if not any(isinstance(m, pkm.MaskedBatchNorm1d) for m in model.modules()):
        raise SystemExit(f"error: {args.run_dir} has no product-key layer with a query "
                         f"BatchNorm (model.pkm.query_norm)")
    split = CorpusSplit.open(Path(cfg.data.corpus), args.split)
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def evaluate() -> dict:
        r = evaluate_lm(model, split, tok.token_bytes, batch_size=cfg.data.batch_size,
                        segment_len=cfg.data.segment_len, max_docs=0,
                        max_tokens=args.max_tokens, autocast=autocast, progress=False)
        return {"loss": r["loss"], "tokens": r["tokens"],
                "used": {k: v["used"] for k, v in r.get("pkm_usage", {}).items()}}

    out = {"running": evaluate()}
    pkm.MaskedBatchNorm1d.forward = batch_statistics
    out["batch"] = evaluate()
    print(json.dumps(out, indent=2))
    (args.run_dir / f"bn-stats-{args.split}.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
