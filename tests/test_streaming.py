"""Document streaming: coverage, order, reset flags, resume and sharding."""

import json

import numpy as np
import pytest
import torch

from memformers.data.corpus import CorpusSplit, build_corpus
from memformers.data.streaming import DocumentStreams
from memformers.errors import MemformersError

L = 8  # segment length used throughout


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> CorpusSplit:
    """~40 documents whose lengths hit the edge cases: 0/1 token, exact multiples of L."""
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    lengths = [1, 2, L, L + 1, 2 * L + 1, 3 * L] + list(rng.integers(2, 60, size=34))
    lines = [json.dumps({"text": "".join(chr(97 + (i + j) % 26) for j in range(n))})
             for i, n in enumerate(lengths)]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    build_corpus(root / "c", root / "docs.jsonl", split="1,0,0", progress=False)
    return CorpusSplit.open(root / "c", "train")


def eligible(split):
    return [i for i in range(split.n_docs) if split.doc_len(i) >= 2]


def reconstruct(batches):
    """{doc id: predictions} rebuilt from batches, plus the document start order.

    Checks along the way that positions are contiguous (no shuffling inside a
    document) and that new_doc is True exactly on each document's first segment.
    """
    seen: dict[int, list[tuple[int, int, int]]] = {}
    starts, current = [], {}
    for b in batches:
        B = b.tokens.shape[0]
        for r in range(B):
            doc, m = int(b.doc_ids[r]), b.mask[r]
            if doc < 0:
                assert not m.any() and not b.new_doc[r] and (b.targets[r] == -100).all()
                continue
            pos = b.doc_pos[r][m].tolist()
            assert m.any() and pos == list(range(pos[0], pos[0] + len(pos)))
            assert m[: len(pos)].all()  # padding only at the end
            assert bool(b.new_doc[r]) == (pos[0] == 0)
            if pos[0] == 0:
                starts.append(doc)
            else:
                assert current[r] == (doc, pos[0])  # continues where the row left off
            current[r] = (doc, pos[-1] + 1)
            seen.setdefault(doc, []).extend(
                zip(pos, b.tokens[r][m].tolist(), b.targets[r][m].tolist()))
            assert (b.tokens[r][~m] == 0).all() and (b.targets[r][~m] == -100).all()
            assert (b.doc_pos[r][~m] == -1).all()
    return seen, starts


def assert_exact_cover(split, seen, docs):
    assert sorted(seen) == sorted(docs)
    for d in docs:
        toks = split.doc(d).astype(np.int64)
        pos, inp, tgt = zip(*seen[d])
        assert list(pos) == list(range(len(toks) - 1))  # every prediction exactly once
        assert list(inp) == toks[:-1].tolist() and list(tgt) == toks[1:].tolist()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_one_epoch_visits_every_token_once(split, batch_size):
    streams = DocumentStreams(split, batch_size, L, seed=1, loop=False)
    batches = list(streams)
    b = batches[0]
    assert b.tokens.shape == b.targets.shape == b.mask.shape == b.doc_pos.shape == (batch_size, L)
    assert b.tokens.dtype == b.targets.dtype == torch.int64 and b.mask.dtype == torch.bool
    assert b.new_doc.shape == b.doc_ids.shape == (batch_size,) and b.new_doc.all()
    seen, starts = reconstruct(batches)
    assert_exact_cover(split, seen, eligible(split))
    assert sum(int((x.targets != -100).sum()) for x in batches) == streams.tokens_per_epoch
    assert sorted(starts) == eligible(split)
    with pytest.raises(StopIteration):
        next(streams)  # stays finished


def test_no_shuffle_keeps_natural_order(split):
    _, starts = reconstruct(DocumentStreams(split, 2, L, shuffle=False, loop=False))
    assert starts == eligible(split)


def test_seeds_change_order(split):
    _, a = reconstruct(DocumentStreams(split, 2, L, seed=0, loop=False))
    _, b = reconstruct(DocumentStreams(split, 2, L, seed=0, loop=False))
    _, c = reconstruct(DocumentStreams(split, 2, L, seed=1, loop=False))
    assert a == b and a != c and sorted(a) == sorted(c)


def test_loop_continues_into_new_epochs(split):
    streams = DocumentStreams(split, 3, L, seed=5, loop=True)
    n = len(eligible(split))
    starts: list[int] = []
    while len(starts) < 3 * n:
        b = next(streams)
        starts += [int(d) for d, f in zip(b.doc_ids, b.new_doc) if f]
    epochs = [starts[i * n:(i + 1) * n] for i in range(3)]
    assert all(sorted(e) == eligible(split) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    assert streams.epoch >= 2


def test_last_segment_padded_next_doc_next_step(split):
    doc = next(i for i in range(split.n_docs) if split.doc_len(i) == L + 1)  # L predictions
    nxt = next(i for i in range(split.n_docs) if split.doc_len(i) == 2 * L + 1)
    streams = DocumentStreams(split, 1, L, loop=False, doc_indices=[doc, nxt], shuffle=False)
    b0, b1, b2 = next(streams), next(streams), next(streams)
    assert b0.mask.all() and b0.new_doc.item() and b0.doc_ids.item() == doc  # exactly full
    assert b1.new_doc.item() and b1.doc_ids.item() == nxt and b1.mask.all()
    assert not b2.new_doc.item() and b2.mask.all()
    with pytest.raises(StopIteration):
        next(streams)


def test_idle_rows_when_not_looping(split):
    short = [i for i in eligible(split) if split.doc_len(i) <= L + 1][:2]
    long = next(i for i in eligible(split) if split.doc_len(i) > 3 * L)
    streams = DocumentStreams(split, 3, L, loop=False, doc_indices=[long] + short,
                              shuffle=False)
    batches = list(streams)
    assert len(batches) == -(-(split.doc_len(long) - 1) // L)
    assert batches[1].doc_ids.tolist() == [long, -1, -1]
    assert not batches[1].mask[1:].any() and not batches[1].new_doc.any()


def test_resume_is_exact(split):
    ref = DocumentStreams(split, 3, L, seed=3, loop=True)
    for _ in range(20):
        next(ref)
    state = json.loads(json.dumps(ref.state_dict()))  # survives JSON
    expected = [next(ref) for _ in range(40)]  # crosses an epoch boundary
    resumed = DocumentStreams(split, 3, L, seed=3, loop=True)
    resumed.load_state_dict(state)
    for a in expected:
        b = next(resumed)
        for name in ("tokens", "targets", "mask", "new_doc", "doc_pos", "doc_ids"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert resumed.epoch == ref.epoch and resumed.state_dict() == ref.state_dict()


def test_resume_rejects_other_config(split):
    state = DocumentStreams(split, 3, L).state_dict()
    with pytest.raises(MemformersError, match="batch_size"):
        DocumentStreams(split, 2, L).load_state_dict(state)


def test_sharding_covers_each_doc_once(split):
    ranks = [DocumentStreams(split, 4, L, seed=7, loop=False, rank=r, world_size=2)
             for r in range(2)]
    batches = [list(s) for s in ranks]
    assert len(batches[0]) == len(batches[1])  # ranks step in lockstep
    assert batches[0][0].tokens.shape == (2, L)  # batch_size is global: 2 rows each
    seen = [reconstruct(b)[0] for b in batches]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert_exact_cover(split, {**seen[0], **seen[1]}, eligible(split))


def test_ranks_together_are_the_single_process_batch(split):
    """Rank r's rows are rows r*B/N.. of the one-process batch, step by step, across epochs."""
    single = DocumentStreams(split, 4, L, seed=2, loop=True)
    ranks = [DocumentStreams(split, 4, L, seed=2, loop=True, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(3 * len(eligible(split))):
        whole, parts = next(single), [next(r) for r in ranks]
        for name in ("tokens", "targets", "mask", "new_doc", "doc_pos", "doc_ids"):
            assert torch.equal(getattr(whole, name),
                               torch.cat([getattr(p, name) for p in parts])), name
    assert single.epoch >= 2
    state = single.state_dict()  # the position does not depend on the world size
    assert ranks[0].state_dict() == ranks[1].state_dict() == state
    resumed = DocumentStreams(split, 4, L, seed=2, loop=True, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed).tokens, next(single).tokens[2:])


def test_errors(split):
    with pytest.raises(MemformersError, match="rank"):
        DocumentStreams(split, 2, L, rank=2, world_size=2)
    with pytest.raises(MemformersError, match="divisible by the 2 ranks"):
        DocumentStreams(split, 3, L, rank=0, world_size=2)
    with pytest.raises(MemformersError, match="no documents"):
        DocumentStreams(split, 2, L, doc_indices=[0])  # the 1-token document
    with pytest.raises(MemformersError, match="positive"):
        DocumentStreams(split, 0, L)
