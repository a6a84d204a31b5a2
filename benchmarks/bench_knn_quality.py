"""What approximate kNN search costs in quality: the same weights, exact vs another backend.

* held-out loss of a model with a kNN memory (a run directory or a shipped name) on the
  ``--docs`` longest documents of ``--split``, by position in document;
* passkey exact match of the shipped ``passkey-knn`` model at ``--passkey-lengths``.

    python benchmarks/bench_knn_quality.py --model reports/demo/runs/xl+knn-* \\
        --out benchmarks/results/knn_quality_ivf.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memformers.cli import load_trained_model
from memformers.data.corpus import CorpusSplit
from memformers.data.tokenizer import ByteTokenizer
from memformers.evaluate.lm import evaluate_lm
from memformers.evaluate.passkey import evaluate_passkey
from memformers.pretrained import load_shipped_model


def lm_losses(model_dir: str, backend_sets: list[str], split_name: str, docs: int,
              capacity: int) -> dict:
    cfg, model, tok = load_trained_model(model_dir, [f"model.knn.capacity={capacity}",
                                                     *backend_sets], "cpu")
    split = CorpusSplit.open(cfg.data.corpus, split_name)
    longest = sorted(range(split.n_docs), key=split.doc_len, reverse=True)[:docs]
    start = time.perf_counter()
    ev = evaluate_lm(model, split, tok.token_bytes, batch_size=docs,
                     segment_len=cfg.data.segment_len, doc_indices=longest, progress=False)
    return {"loss": ev["loss"], "tokens": ev["tokens"],
            "by_position": {k: v["loss"] for k, v in ev["by_position"].items()},
            "seconds": time.perf_counter() - start}


def passkey(backend_sets: list[str], lengths: list[int], samples: int) -> dict:
    _, model = load_shipped_model("passkey-knn", backend_sets)
    start = time.perf_counter()
    r = evaluate_passkey(model, ByteTokenizer(), lengths, [0.1, 0.5, 0.9], segment_len=256,
                         samples_per_cell=samples, seed=10_000, progress=False)
    return {"accuracy": r["accuracy"], "lengths": lengths, "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="run directory or shipped name (kNN layer)")
    p.add_argument("--split", default="test")
    p.add_argument("--docs", type=int, default=2)
    p.add_argument("--capacity", type=int, default=65536)
    p.add_argument("--backend", default="ivf", help="the backend compared with exact")
    p.add_argument("--set", action="append", default=[], help="more settings of that backend")
    p.add_argument("--passkey-lengths", default="16384")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.manual_seed(0)
    contenders = {"exact": ["model.knn.backend=exact"],
                  args.backend: [f"model.knn.backend={args.backend}", *args.set]}
    out = {"model": args.model, "split": args.split, "capacity": args.capacity, "lm": {},
           "passkey": {}}
    lengths = [int(x) for x in args.passkey_lengths.split(",") if x]
    for name, sets in contenders.items():
        out["lm"][name] = lm_losses(args.model, sets, args.split, args.docs, args.capacity)
        if lengths:
            out["passkey"][name] = passkey([f"model.knn.capacity={args.capacity}", *sets],
                                           lengths, args.samples)
        print(name, json.dumps(out["lm"][name]), json.dumps(out["passkey"].get(name)),
              flush=True)
    a, b = out["lm"]["exact"]["loss"], out["lm"][args.backend]["loss"]
    out["loss_change"] = b / a - 1
    print(f"held-out loss: exact {a:.4f}, {args.backend} {b:.4f} ({out['loss_change']:+.3%})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
