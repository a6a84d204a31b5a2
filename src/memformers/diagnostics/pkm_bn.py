"""Held-out loss of a product-key model with its query BatchNorm in two modes:
running statistics (what evaluation uses) and each evaluation batch's own statistics
(real tokens only). A large gap would mean the running statistics do not describe the
held-out queries, i.e. BatchNorm's train/eval mismatch rather than the memory.

    memformers diagnose pkm-bn RUN_DIR [--split valid] [--max-tokens 0]
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import numpy as np
import torch

from memformers.memory.pkm import MaskedBatchNorm1d


def batch_statistics(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MaskedBatchNorm1d.forward in eval, normalising with this batch's real tokens."""
    mean, var, _ = self.masked_moments(x, mask)
    return self.normalise(x, mean, var)


def query_norms(model: torch.nn.Module) -> list[MaskedBatchNorm1d]:
    """The product-key query BatchNorms of a model (model.pkm.query_norm = batchnorm)."""
    return [m for m in model.modules() if isinstance(m, MaskedBatchNorm1d)]


@contextmanager
def per_batch_statistics(model: torch.nn.Module):
    """Within the block every query BatchNorm of ``model`` normalises with the batch's
    own statistics (``batch_statistics``); restored afterwards."""
    norms = query_norms(model)
    for bn in norms:
        bn.forward = types.MethodType(batch_statistics, bn)
    try:
        yield
    finally:
        for bn in norms:
            del bn.forward


def bn_stats(model, split, token_bytes: np.ndarray, *, batch_size: int, segment_len: int,
             max_tokens: int = 0, autocast=None) -> dict:
    """{"running": ..., "batch": ...}: held-out loss, tokens and slot usage per product-key
    layer of ``split``, with the running and with the per-batch statistics."""
    from memformers.evaluate.lm import evaluate_lm

    def evaluate() -> dict:
        r = evaluate_lm(model, split, token_bytes, batch_size=batch_size,
                        segment_len=segment_len, max_docs=0, max_tokens=max_tokens,
                        autocast=autocast, progress=False)
        return {"loss": r["loss"], "tokens": r["tokens"],
                "used": {k: v["used"] for k, v in r.get("pkm_usage", {}).items()}}

    out = {"running": evaluate()}
    with per_batch_statistics(model):
        out["batch"] = evaluate()
    return out
