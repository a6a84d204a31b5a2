"""evaluate/lm.py: per-document sums, document selection, position buckets, the bootstrap."""

import math

import numpy as np
import torch

from memformers.config import ModelConfig
from memformers.data.corpus import CorpusSplit
from memformers.evaluate.lm import bootstrap_change, bucket_start, eval_documents, evaluate_lm
from memformers.model import MemformerLM


def test_by_doc_sums_add_up_and_doc_cap_is_honoured(tiny_corpus):
    split = CorpusSplit.open(tiny_corpus, "valid")
    torch.manual_seed(0)
    model = MemformerLM(ModelConfig(n_layers=1, d_model=16, n_heads=2, head_dim=8, d_ff=32))
    ev = evaluate_lm(model, split, np.ones(256), batch_size=2, segment_len=16, progress=False)
    nll = sum(v[0] for v in ev["by_doc"].values())
    assert sum(v[1] for v in ev["by_doc"].values()) == ev["tokens"]
    assert math.isclose(nll / ev["tokens"], ev["loss"], rel_tol=1e-9)
    capped = evaluate_lm(model, split, np.ones(256), batch_size=2,
                         segment_len=16, max_doc_tokens=50, progress=False)
    assert all(v[1] == min(50, split.doc_len(int(d))) - 1 for d, v in capped["by_doc"].items())


def test_bootstrap_change_is_exact_when_every_document_agrees():
    base = {"by_doc": {str(d): [2.0 * (d + 1), d + 1] for d in range(8)}}  # loss 2.0 each
    other = {"by_doc": {str(d): [1.8 * (d + 1), d + 1] for d in range(8)}}  # -10% each
    c, lo, hi = bootstrap_change(base, other)
    assert math.isclose(c, -0.1) and math.isclose(lo, -0.1) and math.isclose(hi, -0.1)
    mixed = {"by_doc": {str(d): [(1.0 if d % 2 else 3.0) * (d + 1), d + 1] for d in range(8)}}
    c, lo, hi = bootstrap_change(base, mixed)
    assert lo < c < hi and lo < 0 < hi  # documents disagree: the interval spans 0


def test_min_doc_tokens_and_buckets_pick_documents_and_positions(tiny_corpus):
    split = CorpusSplit.open(tiny_corpus, "valid")
    lengths = [split.doc_len(i) for i in range(split.n_docs)]
    cut = sorted(lengths)[len(lengths) // 2]
    long_docs = [i for i, n in enumerate(lengths) if n >= cut]
    assert eval_documents(split, 0, cut) == long_docs
    assert eval_documents(split, 1, cut) == long_docs[:1]
    assert eval_documents(split, 0, 0) == list(range(split.n_docs))
    torch.manual_seed(0)
    model = MemformerLM(ModelConfig(n_layers=1, d_model=16, n_heads=2, head_dim=8, d_ff=32))
    ev = evaluate_lm(model, split, np.ones(256), batch_size=2, segment_len=16,
                     min_doc_tokens=cut, buckets=(0, 100, 1024), progress=False)
    assert sorted(int(d) for d in ev["by_doc"]) == long_docs
    assert list(ev["by_position"]) == ["0-100", "100-1K", "1K+"]
    # a target token at position t (1 .. n - 1 of its document) counts in the bucket of t
    expect = [sum(max(0, min(n, b) - max(1, a)) for n in (lengths[i] for i in long_docs))
              for a, b in ((0, 100), (100, 1024), (1024, 1 << 40))]
    assert [ev["by_position"][k]["tokens"] for k in ev["by_position"]] == expect
    assert [bucket_start(k) for k in ev["by_position"]] == [0, 100, 1024]
    # per document, the tokens past the first bucket add up to those buckets' totals
    late = ev["by_doc_late"]
    assert late["from"] == 100
    assert sum(v[1] for v in late["docs"].values()) == expect[1] + expect[2]
    late_nll = sum(ev["by_position"][k]["loss"] * ev["by_position"][k]["tokens"]
                   for k in ("100-1K", "1K+"))
    assert math.isclose(sum(v[0] for v in late["docs"].values()), late_nll, rel_tol=1e-9)
    assert all(v[1] == lengths[int(d)] - 100 for d, v in late["docs"].items())


def test_bootstrap_change_of_the_late_tokens_reads_only_them():
    docs = {str(d): [2.0 * (d + 1), d + 1] for d in range(8)}
    base = {"by_doc": docs, "by_doc_late": {"from": 2048, "docs": docs}}
    other = {"by_doc": docs,  # no change overall, -20% on every document's late tokens
             "by_doc_late": {"from": 2048, "docs": {d: [0.8 * a, n] for d, (a, n)
                                                    in docs.items()}}}
    assert bootstrap_change(base, other) == (0.0, 0.0, 0.0)
    c, lo, hi = bootstrap_change(base, other, late=True)
    assert math.isclose(c, -0.2) and math.isclose(lo, -0.2) and math.isclose(hi, -0.2)
