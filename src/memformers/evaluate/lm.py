"""Held-out language-model evaluation on long documents, streamed with memory.

Held-out documents are streamed exactly like training (one document per
stream, segment by segment, state reset at each new document) and every
target token is scored once. Reports token-level loss, perplexity and bits
per byte overall and by position in document, where memory should show.

    bits/byte = sum(nll) / (ln 2 * sum(bytes of target tokens))

With ``world_size > 1`` (called by every rank of a distributed run) each rank
streams its own rows of the global ``batch_size`` streams and the sums are
all-reduced, so every rank returns the single-process numbers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed
from tqdm import tqdm

from memformers.data.streaming import DocumentStreams
from memformers.memory import track_usage, usage_report
from memformers.runner import SegmentRunner

POSITION_BUCKETS = (0, 2048, 8192, 32768)


def bucket_names(edges=POSITION_BUCKETS) -> list[str]:
    def k(n: int) -> str:
        return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)
    return [f"{k(a)}-{k(b)}" for a, b in zip(edges, edges[1:])] + [f"{k(edges[-1])}+"]


def bucket_start(name: str) -> int:
    """The first position of a bucket named by ``bucket_names`` ("2K-8K" -> 2048)."""
    first = name.split("-")[0].rstrip("+")
    return int(first[:-1]) * 1024 if first.endswith("K") else int(first)


def eval_documents(split, max_docs: int = 0, min_doc_tokens: int = 0) -> list[int]:
    """The documents an evaluation streams: the first ``max_docs`` (0 = all) of those at
    least ``min_doc_tokens`` long."""
    docs = [i for i in range(split.n_docs) if split.doc_len(i) >= min_doc_tokens]
    return docs[:max_docs] if max_docs else docs


def _summary(nll: float, n_tok: int, n_bytes: int) -> dict:
    loss = nll / max(n_tok, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n_tok, "bytes": n_bytes,
            "bpb": nll / math.log(2) / max(n_bytes, 1)}


@torch.no_grad()
def evaluate_lm(model, split, token_bytes: np.ndarray, *, batch_size: int, segment_len: int,
                max_docs: int = 0, max_tokens: int = 0, max_doc_tokens: int = 0,
                min_doc_tokens: int = 0, buckets=POSITION_BUCKETS,
                record_docs: tuple[int, ...] = (), autocast=None, progress: bool = True,
                rank: int = 0, world_size: int = 1, doc_indices: list[int] | None = None
                ) -> dict:
    """Stream held-out documents of ``split``; see module docstring.

    ``record_docs``: document indices whose per-token losses are returned
    (for per-token loss-difference plots; only documents of this rank's streams).
    ``doc_indices``: the documents to stream (default: the first ``max_docs`` of those
    at least ``min_doc_tokens`` long, or all of them). ``buckets``: the first position of
    each position bucket, starting at 0.
    """
    device = next(model.parameters()).device
    if doc_indices is None:
        doc_indices = eval_documents(split, max_docs, min_doc_tokens)
    n_docs = len(doc_indices)
    streams = DocumentStreams(split, batch_size, segment_len, shuffle=False, loop=False,
                              doc_indices=doc_indices, rank=rank,
                              world_size=world_size, max_doc_tokens=max_doc_tokens)
    edges = torch.tensor(buckets[1:], device=device)
    tbytes = torch.as_tensor(np.asarray(token_bytes), device=device, dtype=torch.float64)
    n_b = len(buckets)
    nll_sum = torch.zeros(n_b, dtype=torch.float64, device=device)
    tok_sum = torch.zeros(n_b, dtype=torch.float64, device=device)
    byte_sum = torch.zeros(n_b, dtype=torch.float64, device=device)
    recorded: dict[int, list[np.ndarray]] = {d: [] for d in record_docs}
    by_doc: dict[int, list[float]] = {}  # document -> [nll sum, tokens] (for bootstraps)
    by_doc_late: dict[int, list[float]] = {}  # the same, from the second bucket on
    total = streams.tokens_per_epoch
    if max_tokens:
        total = min(total, max_tokens)
    bar = tqdm(total=total, desc="eval", unit="tok", disable=not progress, leave=False)
    runner = SegmentRunner(model, autocast)
    seen = 0
    with runner.fresh_state(len(streams.rows), device), track_usage(model) as usage:
        for batch, logits, _ in runner.run(streams, device):
            usage.observe(batch)
            targets = batch.targets
            nll = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                reduction="none").view_as(targets).double()  # (B, L)
            valid = targets != -100
            pos = batch.doc_pos + 1  # position of the predicted token
            b = torch.bucketize(pos, edges, right=True)
            w = valid.double()
            nll_sum.index_add_(0, b[valid], nll[valid])
            tok_sum.index_add_(0, b[valid], w[valid])
            byte_sum.index_add_(0, b[valid], tbytes[targets[valid]])
            late = w * (b >= 1)  # past the first bucket (beyond 2K by default)
            per_row = ((by_doc, (nll * w).sum(1).tolist(), w.sum(1).tolist()),
                       (by_doc_late, (nll * late).sum(1).tolist(), late.sum(1).tolist()))
            for row, doc in enumerate(batch.doc_ids.tolist()):
                if doc in recorded:
                    recorded[doc].append(nll[row][valid[row]].float().cpu().numpy())
                for table, row_nll, row_tok in per_row:
                    if doc >= 0 and row_tok[row]:
                        acc = table.setdefault(doc, [0.0, 0])
                        acc[0] += row_nll[row]
                        acc[1] += int(row_tok[row])
            n = valid.sum()
            if world_size > 1:  # ranks step in lockstep: all see the same global count
                torch.distributed.all_reduce(n)
            n = int(n)
            seen += n
            bar.update(n)
            if max_tokens and seen >= max_tokens:
                break
    bar.close()
    if world_size > 1:
        for t in (nll_sum, tok_sum, byte_sum):
            torch.distributed.all_reduce(t)
    nll_l, tok_l, byte_l = nll_sum.tolist(), tok_sum.tolist(), byte_sum.tolist()
    out = _summary(sum(nll_l), int(sum(tok_l)), int(sum(byte_l)))
    out["documents"] = n_docs
    out["by_doc"] = {str(d): v for d, v in sorted(by_doc.items())}  # this rank's documents
    if len(buckets) > 1:  # the tokens beyond the first bucket, per document
        out["by_doc_late"] = {"from": int(buckets[1]),
                              "docs": {str(d): v for d, v in sorted(by_doc_late.items())}}
    out["by_position"] = {name: _summary(a, int(t), int(c))
                          for name, a, t, c in zip(bucket_names(buckets), nll_l, tok_l, byte_l)
                          if t > 0}
    out.update(usage_report(model, world_size))  # e.g. slot usage per product-key layer
    if record_docs:
        out["per_token"] = {d: np.concatenate(v).tolist() if v else [] for d, v in recorded.items()}
    return out


def bootstrap_change(base: dict, other: dict, n: int = 2000, seed: int = 0,
                     late: bool = False) -> tuple[float, float, float]:
    """Relative loss change other/base - 1 over the documents both scored, with a 95% paired
    bootstrap interval over documents: (change, low, high). ``base`` and ``other`` are
    ``evaluate_lm`` results (their ``by_doc`` sums; ``late``: only the tokens past the first
    position bucket, ``by_doc_late``)."""
    pa, pb = ((r["by_doc_late"]["docs"] if late else r["by_doc"]) for r in (base, other))
    docs = sorted(set(pa) & set(pb))
    if not docs:
        return math.nan, math.nan, math.nan
    a = np.array([pa[d] for d in docs], dtype=np.float64)  # (D, 2) nll, tokens
    b = np.array([pb[d] for d in docs], dtype=np.float64)
    change = (b[:, 0].sum() / b[:, 1].sum()) / (a[:, 0].sum() / a[:, 1].sum()) - 1
    idx = np.random.default_rng(seed).integers(0, len(docs), (n, len(docs)))
    ratios = (b[idx, 0].sum(1) / b[idx, 1].sum(1)) / (a[idx, 0].sum(1) / a[idx, 1].sum(1)) - 1
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(change), float(low), float(high)


def format_eval(result: dict) -> str:
    lines = [f"held-out: loss {result['loss']:.4f}  ppl {result['ppl']:.3f}  "
             f"bpb {result['bpb']:.4f}  ({result['tokens']:,} tokens, "
             f"{result['documents']} documents)"]
    for name, r in result["by_position"].items():
        lines.append(f"  tokens {name:>9}: loss {r['loss']:.4f}  ppl {r['ppl']:.3f}  "
                     f"bpb {r['bpb']:.4f}  ({r['tokens']:,})")
    for name, r in result.get("knn_retrieval", {}).items():
        heads = " ".join(f"{p:.2f}" for p in r["precision"])
        lines.append(f"  retrieval {name}: next token of a retrieved pair = the target, per "
                     f"head: {heads} (top-1 {sum(r['top1']) / len(r['top1']):.2f}, "
                     f"random pair {r['chance']:.2f})")
        if "copy" in r:
            lines.append(f"  retrieval {name}: own token of a retrieved pair = the target "
                         f"(what attention can copy): "
                         + " ".join(f"{p:.2f}" for p in r["copy"]))
    for name, u in result.get("pkm_usage", {}).items():
        lines.append(f"  product keys {name}: {u['used']:.1%} of {u['slots']:,} slots used, "
                     f"KL from uniform {u['kl_uniform']:.3f}, 50/90/99% of the weight in "
                     f"{u['slots_50']:,} / {u['slots_90']:,} / {u['slots_99']:,} slots")
    return "\n".join(lines)
