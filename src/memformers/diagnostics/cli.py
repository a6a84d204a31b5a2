"""The ``memformers diagnose`` command: ``diagnose pkm-bn RUN_DIR``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memformers.errors import MemformersError


def add_diagnose_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``diagnose`` (with ``pkm-bn``) on the main CLI's subparsers."""
    diag = subparsers.add_parser("diagnose", help="probes of a trained model's behaviour")
    sub = diag.add_subparsers(dest="diagnose_command", metavar="{pkm-bn}")
    sub.required = True

    b = sub.add_parser("pkm-bn", help="held-out loss with the PKM query BatchNorm's running "
                                      "vs per-batch statistics",
                       description="Held-out loss of a product-key run with its query "
                                   "BatchNorm's running statistics and with each batch's own "
                                   "(real tokens only); writes RUN_DIR/bn-stats-SPLIT.json.")
    b.add_argument("run_dir", type=Path)
    b.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    b.add_argument("--max-tokens", type=int, default=0, help="stop after N tokens (0 = all)")
    b.add_argument("--device", default="auto")
    b.set_defaults(func=cmd_pkm_bn)
    return diag


def cmd_pkm_bn(args) -> int:
    import torch

    from memformers.cli import load_trained_model
    from memformers.data.corpus import CorpusSplit
    from memformers.diagnostics.pkm_bn import bn_stats, query_norms

    cfg, model, tok = load_trained_model(args.run_dir, [], args.device)
    if not query_norms(model):
        raise MemformersError(f"{args.run_dir} has no product-key layer with a query "
                              f"BatchNorm (model.pkm.query_norm)")
    split = CorpusSplit.open(Path(cfg.data.corpus), args.split)
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    out = bn_stats(model, split, tok.token_bytes, batch_size=cfg.data.batch_size,
                   segment_len=cfg.data.segment_len, max_tokens=args.max_tokens,
                   autocast=autocast)
    print(json.dumps(out, indent=2))
    (args.run_dir / f"bn-stats-{args.split}.json").write_text(json.dumps(out, indent=2))
    return 0
