"""Choose the kNN-LM's lambda and temperature on held-out data (``memformers knnlm-tune``).

One pass streams the documents of a split through the model exactly as evaluation does
and records, for every scored token, log p_LM(target) and the similarities of its top-k
retrieved pairs with whether each pair's next token is the target. Every (lambda,
temperature) of the grid is then scored from those records without running the model
again:

    loss(lambda, T) = mean_t -log((1 - lambda) p_LM(x_t)
                                  + lambda sum_i softmax(s_i / T) [v_i = x_t])

Adaptive retrieval (``retrieve_below``: search only where max p_LM is below a threshold)
is scored from the same records: a position that does not search keeps p_LM.

Tune on the valid split, report on test.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from memformers.data.streaming import DocumentStreams
from memformers.errors import MemformersError
from memformers.evaluate.lm import eval_documents
from memformers.memory.knnlm import searching
from memformers.runner import SegmentRunner

LAMBDAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
TEMPERATURES = (0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.075, 0.1, 0.2)
RETRIEVE_BELOW = (1.0, 0.99, 0.95, 0.9, 0.8, 0.7, 0.5)


@torch.no_grad()
def record_neighbours(model, split, *, batch_size: int, segment_len: int, max_docs: int = 0,
                      max_tokens: int = 0, max_doc_tokens: int = 0, min_doc_tokens: int = 0,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    """{"log_lm": (N,), "log_max": (N,), "sim": (N, k), "hit": (N, k) bool} over the split's
    scored tokens (log_max: the log of the largest p_LM)."""
    head = model.knnlm
    if head is None:
        raise MemformersError("knnlm-tune needs a kNN-LM: --set model.knnlm.capacity=N")
    device = next(model.parameters()).device
    streams = DocumentStreams(split, batch_size, segment_len, shuffle=False, loop=False,
                              doc_indices=eval_documents(split, max_docs, min_doc_tokens),
                              max_doc_tokens=max_doc_tokens)
    out: dict[str, list] = {"log_lm": [], "log_max": [], "sim": [], "hit": []}
    total = streams.tokens_per_epoch if not max_tokens else min(max_tokens,
                                                                  streams.tokens_per_epoch)
    bar = tqdm(total=total, desc="knnlm-tune", unit="tok", disable=not progress, leave=False)

    def lm_and_neighbours(seg):  # the head's read and write, without mixing
        h, keys, mask = model.features(seg.tokens, new_doc=seg.new_doc, mask=seg.mask)
        sim, values = head.neighbours(keys, seg.tokens, mask)
        head.write(keys, seg.tokens, mask)
        return torch.log_softmax(model.head(h).float(), -1), sim, values

    seen = 0
    runner = SegmentRunner(model)
    with runner.fresh_state(batch_size, device):
        for batch, (log_lm, sim, values), _ in runner.run(streams, device, lm_and_neighbours):
            targets = batch.targets
            valid = targets != -100
            tgt = targets.clamp(min=0)
            out["log_lm"].append(log_lm.gather(2, tgt[..., None])[..., 0][valid].cpu())
            out["log_max"].append(log_lm.max(-1).values[valid].cpu())
            out["sim"].append(sim[valid].cpu())
            out["hit"].append((values == tgt[..., None])[valid].cpu())
            n = int(valid.sum())
            seen += n
            bar.update(n)
            if max_tokens and seen >= max_tokens:
                break
    bar.close()
    return {k: torch.cat(v) for k, v in out.items()}


def mixture_loss(rec: dict[str, torch.Tensor], lam: float, temperature: float,
                 retrieve_below: float = 1.0) -> float:
    """Mean -log of the mixture's probability of the targets (nats per token)."""
    sim = rec["sim"].double()
    found = torch.isfinite(sim).any(-1) & searches(rec, retrieve_below)
    w = torch.softmax(sim.masked_fill(~found[:, None], 0.0) / temperature, -1)
    p_knn = (w * rec["hit"]).nan_to_num(0.0).sum(-1)
    p_lm = rec["log_lm"].double().exp()
    p = torch.where(found, (1 - lam) * p_lm + lam * p_knn, p_lm)
    return float(-p.log().mean())


def searches(rec: dict[str, torch.Tensor], retrieve_below: float) -> torch.Tensor:
    """(N,) bool: the positions that search under ``retrieve_below`` (KNNLM.asks)."""
    ask = searching(rec["log_max"], retrieve_below)
    return torch.ones_like(rec["log_max"], dtype=torch.bool) if ask is None else ask


def tune(rec: dict[str, torch.Tensor], lambdas=LAMBDAS, temperatures=TEMPERATURES,
         thresholds=RETRIEVE_BELOW) -> dict:
    """The grid's losses and its best (lambda, temperature); then, at that pair, the loss
    and the share of positions that search for each adaptive-retrieval threshold."""
    base = float(-rec["log_lm"].double().mean())
    grid = [{"lam": lam, "temperature": t, "loss": mixture_loss(rec, lam, t)}
            for lam in lambdas for t in temperatures]
    best = min(grid, key=lambda r: r["loss"])
    adaptive = [{"retrieve_below": x, "searched": float(searches(rec, x).double().mean()),
                 "loss": mixture_loss(rec, best["lam"], best["temperature"], x)}
                for x in thresholds]
    return {"tokens": int(rec["log_lm"].numel()), "base_loss": base, "best": best,
            "gain": 1 - best["loss"] / base, "grid": grid, "adaptive": adaptive}


def format_tune(result: dict) -> str:
    b = result["best"]
    lines = [f"{result['tokens']:,} tokens: base loss {result['base_loss']:.4f}; best "
             f"lambda {b['lam']} temperature {b['temperature']}: {b['loss']:.4f} "
             f"({-100 * result['gain']:+.1f}%)"]
    temps = sorted({r["temperature"] for r in result["grid"]})
    lines.append("| lambda \\ T | " + " | ".join(f"{t:g}" for t in temps) + " |")
    lines.append("|---|" + "---:|" * len(temps))
    for lam in sorted({r["lam"] for r in result["grid"]}):
        row = [r["loss"] for r in result["grid"] if r["lam"] == lam]
        lines.append(f"| {lam:g} | " + " | ".join(f"{x:.4f}" for x in row) + " |")
    lines.append(f"use: --set model.knnlm.lam={b['lam']} --set "
                 f"model.knnlm.temperature={b['temperature']}")
    lines.append("| retrieve_below | positions searched | loss | vs searching everywhere |")
    lines.append("|---:|---:|---:|---:|")
    for r in result.get("adaptive", []):
        lines.append(f"| {r['retrieve_below']:g} | {r['searched']:.1%} | {r['loss']:.4f} | "
                     f"{r['loss'] / b['loss'] - 1:+.2%} |")
    return "\n".join(lines)


__all__ = ["format_tune", "mixture_loss", "record_neighbours", "tune"]
