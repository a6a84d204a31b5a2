"""The ``memformers diagnose`` command: ``diagnose pkm-bn RUN_DIR`` and
``diagnose key-staleness RUN_DIR --old WEIGHTS``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memformers.errors import MemformersError


def add_diagnose_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``diagnose`` (with ``pkm-bn``) on the main CLI's subparsers."""
    diag = subparsers.add_parser("diagnose", help="probes of a trained model's behaviour")
    sub = diag.add_subparsers(dest="diagnose_command", metavar="{pkm-bn,key-staleness}")
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

    k = sub.add_parser("key-staleness", help="kNN top-k overlap of keys written by older "
                                             "weights against fresh ones",
                       description="Reads the same held-out segments with the run's weights "
                                   "and with older ones (--old) and reports, per kNN layer and "
                                   "head, how much of the top-k retrieved from the older keys "
                                   "fresh keys would also retrieve (1 = not stale; "
                                   "diagnostics/key_staleness.py). Writes "
                                   "RUN_DIR/key-staleness-SPLIT.json.")
    k.add_argument("run_dir", type=Path)
    k.add_argument("--old", required=True,
                   help="the older weights: a checkpoint directory (RUN/checkpoints/step_N), "
                        "a .safetensors file, or another run directory, of the same model")
    k.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    k.add_argument("--segments", type=int, default=32,
                   help="held-out segments per stream read before the probed one")
    k.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the run (e.g. data.batch_size=2)")
    k.add_argument("--device", default="auto")
    k.set_defaults(func=cmd_key_staleness)
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


def _weights_file(path: Path) -> Path:
    """A .safetensors file, or the model.safetensors of a checkpoint or run directory."""
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise MemformersError(f"no weights at {path}: give a .safetensors file, a checkpoint "
                              f"directory or a run directory")
    return path


def cmd_key_staleness(args) -> int:
    import copy

    from memformers.cli import load_trained_model
    from memformers.diagnostics.key_staleness import key_overlap, knn_layers, snapshot
    from memformers.tasks.base import build_task
    from memformers.train.checkpoint import load_model_weights

    if args.segments < 1:
        raise MemformersError(f"--segments must be at least 1, got {args.segments}")
    old_path = _weights_file(Path(args.old))
    cfg, model, tok = load_trained_model(args.run_dir, [*args.set,
                                                        f"data.eval_split='{args.split}'"],
                                         args.device)
    if cfg.task.name != "lm":
        raise MemformersError(f"key-staleness reads held-out documents: {args.run_dir} is a "
                              f"'{cfg.task.name}' run, not a language-model run")
    if not knn_layers(model):
        raise MemformersError(f"{args.run_dir} has no kNN memory layer with a capacity "
                              f"(model.knn)")
    old = copy.deepcopy(model)
    load_model_weights(old, old_path)
    segments = build_task(cfg, tok).held_out_segments(args.segments + 1)
    if len(segments) < 2:
        raise MemformersError(f"the {args.split} split is shorter than two segments")
    out = {"run": str(args.run_dir), "old": str(old_path), "split": args.split,
           "segments": len(segments), "streams": int(segments[0].tokens.shape[0]),
           "overlap": key_overlap(model, snapshot(old), segments)}
    for name, heads in out["overlap"].items():
        print(f"{name}: top-k overlap, stale vs fresh keys, mean {sum(heads) / len(heads):.3f}"
              f" (per head {' '.join(f'{x:.2f}' for x in heads)})")
    (args.run_dir / f"key-staleness-{args.split}.json").write_text(json.dumps(out, indent=2))
    return 0
