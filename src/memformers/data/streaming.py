"""Long-document streaming (Memorizing Transformers, Fig. 2).

``B`` batch rows are independent *streams*. Each stream reads one whole
document, in order, ``L`` tokens per step, then takes the next document from
a queue shared by all streams. A document of ``n`` tokens gives ``n - 1``
predictions (inputs ``doc[0:n-1]``, targets ``doc[1:n]``) cut into
consecutive segments of ``L``; its last segment is right-padded and the next
document begins in that row at the next step, flagged by ``new_doc`` so that
every per-stream memory is reset.

     step:    0        1        2        3
     row 0: [a0 a1] [a2 a3] [a4 . ] [d0 d1] ...
     row 1: [b0 b1] [b2 . ] [c0 c1] [c2 c3] ...

The queue is a seeded permutation of the documents per epoch (``seed +
epoch``). With ``world_size > 1`` (distributed training) ``batch_size`` is
the GLOBAL number of streams: every rank runs the same bookkeeping for all
of them (document order, offsets: a few integers per stream) and materialises
only its own rows ``rank * b .. (rank + 1) * b - 1`` with ``b = batch_size /
world_size``. So every document is read by exactly one stream, hence by
exactly one rank, per epoch, and the union of the ranks' rows is exactly the
single-process batch. The stream's position is a small JSON-able
``state_dict``, the same on every rank and independent of the world size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from memformers.data.corpus import CorpusSplit
from memformers.errors import MemformersError
from memformers.runner import Segment

IGNORE_INDEX = -100
STATE_VERSION = 1


@dataclass
class Batch(Segment):
    """One segment of every stream (``runner.Segment``), with where it lies in its document.

    tokens (B, L) int64 input ids (0 where mask is False); targets (B, L) int64 next-token
    targets, -100 where no target; mask (B, L) bool, True for real input tokens; new_doc
    (B,) bool, the row starts a new document: reset its state."""

    doc_pos: torch.Tensor | None = None  # (B, L) int64 position of each input token, -1 on pad
    doc_ids: torch.Tensor | None = None  # (B,) int64 document index in the split, -1: idle row


class DocumentStreams:
    """An iterator of ``Batch``es streaming whole documents through ``batch_size`` rows."""

    def __init__(
        self,
        split: CorpusSplit,
        batch_size: int,
        segment_len: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        loop: bool = True,
        doc_indices: Sequence[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        min_doc_tokens: int = 2,
        max_doc_tokens: int = 0,
    ) -> None:
        if batch_size <= 0 or segment_len <= 0:
            raise MemformersError(f"batch_size and segment_len must be positive, got "
                                  f"{batch_size} and {segment_len}")
        if not 0 <= rank < world_size:
            raise MemformersError(f"rank must be in [0, world_size), got rank {rank} of "
                                  f"{world_size}")
        if batch_size % world_size:
            raise MemformersError(f"data.batch_size ({batch_size}) is the global number of "
                                  f"streams and must be divisible by the {world_size} ranks")
        self.split = split
        self.batch_size, self.segment_len = batch_size, segment_len
        self.shuffle, self.seed, self.loop = shuffle, seed, loop
        self.rank, self.world_size = rank, world_size
        per_rank = batch_size // world_size
        self.rows = range(rank * per_rank, (rank + 1) * per_rank)  # this rank's streams

        # the documents one epoch visits (over all ranks): at least 2 tokens each
        candidates = range(split.n_docs) if doc_indices is None else doc_indices
        lengths = np.diff(split.offsets)
        if max_doc_tokens > 0:  # only each document's first max_doc_tokens tokens
            lengths = np.minimum(lengths, max_doc_tokens)
        min_len = max(2, min_doc_tokens)
        for i in candidates:
            if not 0 <= i < split.n_docs:
                raise MemformersError(f"doc_indices: document {i} out of range "
                                      f"(split has {split.n_docs})")
        self.docs = np.array([i for i in candidates if lengths[i] >= min_len], dtype=np.int64)
        if len(self.docs) == 0:
            raise MemformersError(f"no documents with at least {min_len} tokens in the "
                                  f"{split.split} split to stream")
        self.tokens_per_epoch = int((lengths[self.docs] - 1).sum())  # targets, all ranks
        self._lengths = lengths

        self.epoch = 0
        self._order = self._epoch_order(0)
        self._pos = 0  # next queue position in this rank's order
        self._stream_doc = [-1] * batch_size  # current document per row, -1 = needs one
        self._stream_off = [0] * batch_size  # next input position within that document
        self._done = False

    # ------------------------------------------------------------------ queue

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The documents of ``epoch``, in visiting order (the same on every rank)."""
        order = self.docs
        if self.shuffle:
            order = order[np.random.default_rng(self.seed + epoch).permutation(len(order))]
        return order

    def _next_doc(self) -> int:
        """Pop the next document from the shared queue (-1 if exhausted and not looping)."""
        while self._pos >= len(self._order):
            if not self.loop:
                return -1
            self.epoch += 1
            self._order = self._epoch_order(self.epoch)
            self._pos = 0
        doc = int(self._order[self._pos])
        self._pos += 1
        return doc

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> DocumentStreams:
        return self

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        for b in range(self.batch_size):
            if self._stream_doc[b] < 0:
                self._stream_doc[b] = self._next_doc()
                self._stream_off[b] = 0
        if all(d < 0 for d in self._stream_doc):
            self._done = True
            raise StopIteration

        B, L, first = len(self.rows), self.segment_len, self.rows.start
        tokens = np.zeros((B, L), dtype=np.int64)
        targets = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
        doc_pos = np.full((B, L), -1, dtype=np.int64)
        new_doc = np.zeros(B, dtype=bool)
        doc_ids = np.array(self._stream_doc[first:first + B], dtype=np.int64)
        offsets, data = self.split.offsets, self.split.tokens
        for g in range(self.batch_size):  # every global stream advances; own rows are read
            doc = self._stream_doc[g]
            if doc < 0:
                continue  # idle row (evaluation ran out of documents)
            n, off = int(self._lengths[doc]), self._stream_off[g]
            k = min(L, n - 1 - off)  # predictions in this segment
            if g in self.rows:
                b, start = g - first, int(offsets[doc])
                seg = data[start + off:start + off + k + 1]  # (k + 1,) inputs + last target
                tokens[b, :k] = seg[:k]
                targets[b, :k] = seg[1:]
                doc_pos[b, :k] = np.arange(off, off + k)
                new_doc[b] = off == 0
            if off + k >= n - 1:
                self._stream_doc[g] = -1  # finished: next document at the next step
            else:
                self._stream_off[g] = off + k
        return Batch(
            tokens=torch.from_numpy(tokens),
            targets=torch.from_numpy(targets),
            mask=torch.from_numpy(doc_pos >= 0),
            new_doc=torch.from_numpy(new_doc),
            doc_pos=torch.from_numpy(doc_pos),
            doc_ids=torch.from_numpy(doc_ids),
        )

    # ------------------------------------------------------------------ resume

    def _signature(self) -> dict:  # the rank and world size are not part of the state
        return {"batch_size": self.batch_size, "segment_len": self.segment_len,
                "shuffle": self.shuffle, "seed": self.seed, "loop": self.loop,
                "n_docs": len(self.docs), "tokens_per_epoch": self.tokens_per_epoch}

    def state_dict(self) -> dict:
        """Plain JSON-able position of every stream and of the queue."""
        return {"version": STATE_VERSION, **self._signature(), "epoch": self.epoch,
                "pos": self._pos, "stream_doc": list(self._stream_doc),
                "stream_off": list(self._stream_off), "done": self._done}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the stream that made ``state`` was."""
        if state.get("version") != STATE_VERSION:
            raise MemformersError(f"data stream state has version {state.get('version')}, "
                                  f"expected {STATE_VERSION}")
        for key, value in self._signature().items():
            if state.get(key) != value:
                raise MemformersError(f"cannot resume the data stream: {key} was "
                                      f"{state.get(key)}, now {value}")
        self.epoch, self._pos = int(state["epoch"]), int(state["pos"])
        self._order = self._epoch_order(self.epoch)
        self._stream_doc = [int(d) for d in state["stream_doc"]]
        self._stream_off = [int(o) for o in state["stream_off"]]
        self._done = bool(state["done"])
