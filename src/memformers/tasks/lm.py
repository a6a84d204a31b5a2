"""Language modelling on long documents: the default task.

Training streams the corpus's train documents (``data.DocumentStreams``: one document
per stream, segment by segment, state reset at each new document) in windows of
``train.bptt_segments`` segments; evaluation streams the held-out split the same way
and reports the loss by position in document (``evaluate.lm.evaluate_lm``).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from memformers.data.corpus import CorpusSplit
from memformers.data.streaming import DocumentStreams
from memformers.errors import MemformersError
from memformers.runner import Segment, SegmentRunner
from memformers.tasks.base import Task


class LMTask(Task):
    name = "lm"

    def __init__(self, train: DocumentStreams, eval_split: CorpusSplit, token_bytes, *,
                 window: int, data_cfg, rank: int = 0, world_size: int = 1):
        self.stream, self.eval_split, self.token_bytes = train, eval_split, token_bytes
        self.window, self.data = window, data_cfg
        self.rank, self.world_size = rank, world_size

    @classmethod
    def from_config(cls, cfg, tokenizer, *, rank: int = 0, world_size: int = 1) -> LMTask:
        d, corpus = cfg.data, Path(cfg.data.corpus)
        train = CorpusSplit.concat([CorpusSplit.open(c, "train") for c in [corpus, *d.mix]])
        eval_split = CorpusSplit.open(corpus, d.eval_split)
        if eval_split.n_docs == 0:  # fail now, not at the final evaluation
            raise MemformersError(f"the {d.eval_split} split of {corpus} has no "
                                  f"documents: rebuild the corpus with a --split that gives "
                                  f"it some, or set data.eval_split")
        stream = DocumentStreams(train, d.batch_size, d.segment_len, shuffle=True,
                                 seed=cfg.train.seed, loop=True,
                                 min_doc_tokens=d.min_doc_tokens, rank=rank,
                                 world_size=world_size)
        return cls(stream, eval_split, tokenizer.token_bytes, window=cfg.train.bptt_segments,
                   data_cfg=d, rank=rank, world_size=world_size)

    def next_window(self) -> list[Segment]:
        return [next(self.stream) for _ in range(self.window)]

    def held_out_segments(self, n: int) -> list[Segment]:
        """The first ``n`` segments of this rank's held-out streams (first documents)."""
        d = self.data
        streams = DocumentStreams(self.eval_split, d.batch_size, d.segment_len, shuffle=False,
                                  loop=False, rank=self.rank, world_size=self.world_size,
                                  max_doc_tokens=d.eval_max_doc_tokens)
        return list(itertools.islice(streams, n))

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def evaluate(self, runner: SegmentRunner, *, progress: bool = True, **kw) -> dict:
        """Held-out loss by position; with several processes each streams its share of
        the documents and the sums are all-reduced (every rank gets the same result)."""
        from memformers.evaluate.lm import evaluate_lm

        d = self.data
        return evaluate_lm(runner.model, self.eval_split, self.token_bytes,
                           batch_size=d.batch_size, segment_len=d.segment_len,
                           max_docs=d.eval_max_docs, max_tokens=d.eval_max_tokens,
                           max_doc_tokens=d.eval_max_doc_tokens,
                           min_doc_tokens=d.eval_min_doc_tokens, buckets=(0, *d.eval_buckets),
                           autocast=runner.autocast,
                           progress=progress, rank=self.rank, world_size=self.world_size,
                           **kw)

    def format_result(self, result: dict) -> str:
        from memformers.evaluate.lm import format_eval

        return format_eval(result)
