"""Passkey retrieval: find a number hidden at a chosen depth of a long distractor text.

The prompt of Infini-attention (Munkhdalai et al. 2024, sec. 4.2; after Mohtashami &
Jaggi 2023), with everything but the needle made of a repeated, digit-free filler:

    <prefix> <filler ...> <needle> <filler ...> <question>  -> answer " {key}"

    prefix   = "There is an important info hidden inside a lot of irrelevant text. Find it
                and memorize them. I will quiz you about the important information there. "
    filler   = "The grass is green. The sky is blue. The sun is yellow. Here we go.
                There and back again. "  (repeated, cut to fit)
    needle   = "The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"

Each piece is tokenised on its own and the ids are concatenated, so lengths are exact
for any tokenizer (for the byte tokenizer this equals tokenising the whole text). The
filler is cut to the token so the prompt has exactly the requested length, and the
needle is inserted at the filler-sentence boundary nearest to ``depth`` (0 = right
after the prefix, 1 = right before the question).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from memformers.errors import MemformersError
from memformers.runner import Segment, segments_of
from memformers.tasks.base import Task

PREFIX = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there. "
)
FILLER_SENTENCES = (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
ANSWER = " {key}"


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class PasskeyExample:
    tokens: np.ndarray  # (length_tokens,) int64 prompt ids, ending with the question
    answer: np.ndarray  # (A,) int64 ids of " {key}"
    key: str
    needle_start: int  # token index of the needle's first token in ``tokens``
    depth: float  # the requested depth


def _ids(tokenizer: Tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def filler_tokens(tokenizer: Tokenizer, n_tokens: int) -> tuple[np.ndarray, list[int]]:
    """``n_tokens`` of repeated filler and the token offsets of its sentence boundaries.

    Boundaries are 0, the end of each whole sentence, and ``n_tokens`` (the cut).
    """
    sentences = [_ids(tokenizer, s) for s in FILLER_SENTENCES]
    parts, bounds, total, i = [], [0], 0, 0
    while total < n_tokens:
        s = sentences[i % len(sentences)][: n_tokens - total]
        parts.append(s)
        total += len(s)
        bounds.append(total)
        i += 1
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return ids, bounds


def random_key(rng: np.random.Generator, digits: int = 5) -> str:
    """A ``digits``-digit decimal number without a leading zero."""
    if digits < 1:
        raise MemformersError(f"passkey digits must be >= 1, got {digits}")
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def build_passkey_prompt(
    tokenizer: Tokenizer, length_tokens: int, depth: float, key: str
) -> PasskeyExample:
    """The passkey prompt for a given ``key``, exactly ``length_tokens`` tokens long."""
    if not 0.0 <= depth <= 1.0:
        raise MemformersError(f"passkey depth must be in [0, 1], got {depth}")
    prefix, question = _ids(tokenizer, PREFIX), _ids(tokenizer, QUESTION)
    needle = _ids(tokenizer, NEEDLE.format(key=key))
    answer = _ids(tokenizer, ANSWER.format(key=key))
    fixed = len(prefix) + len(needle) + len(question)
    if length_tokens < fixed:
        raise MemformersError(
            f"passkey length {length_tokens} is too short: the prompt needs {fixed} tokens")
    filler, bounds = filler_tokens(tokenizer, length_tokens - fixed)
    cut = min(bounds, key=lambda b: abs(b - depth * len(filler)))  # nearest sentence boundary
    tokens = np.concatenate([prefix, filler[:cut], needle, filler[cut:], question])
    return PasskeyExample(tokens=tokens, answer=answer, key=key,
                          needle_start=len(prefix) + cut, depth=depth)


def make_passkey_example(
    tokenizer: Tokenizer,
    length_tokens: int,
    depth: float,
    rng: np.random.Generator,
    *,
    digits: int = 5,
) -> PasskeyExample:
    """A random-key passkey prompt of exactly ``length_tokens`` tokens, needle at ``depth``."""
    return build_passkey_prompt(tokenizer, length_tokens, depth, random_key(rng, digits))


def passkey_training_example(
    tokenizer: Tokenizer,
    length_tokens: int,
    depth: float,
    rng: np.random.Generator,
    *,
    digits: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, targets), both exactly ``length_tokens`` long, for fine-tuning.

    ``targets[i]`` is the label of the prediction made at ``tokens[i]`` (the next
    token): the answer ids where the next token belongs to the answer, -100 elsewhere.
    The sequence is prompt + answer minus its last token (which predicts nothing).
    """
    key = random_key(rng, digits)
    n_answer = len(_ids(tokenizer, ANSWER.format(key=key)))
    ex = build_passkey_prompt(tokenizer, length_tokens - n_answer + 1, depth, key)
    full = np.concatenate([ex.tokens, ex.answer])
    tokens, targets = full[:-1].copy(), np.full(length_tokens, -100, dtype=np.int64)
    targets[len(ex.tokens) - 1:] = ex.answer
    return tokens, targets


def passkey_training_batch(
    tokenizer: Tokenizer,
    batch_size: int,
    length_tokens: int,
    rng: np.random.Generator,
    *,
    digits: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """(B, length_tokens) tokens and targets with depths drawn uniformly from [0, 1]."""
    pairs = [passkey_training_example(tokenizer, length_tokens, float(rng.uniform()), rng,
                                      digits=digits) for _ in range(batch_size)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def passkey_documents(tokenizer: Tokenizer, n_docs: int, min_len: int, max_len: int,
                      rng: np.random.Generator, *, digits: int = 5):
    """``(name, text)`` passkey documents (prompt + answer) of random length and depth.

    Trained on as ordinary documents mixed into a corpus (``data.mix``), they teach
    a model to carry a key across segments: the answer at the end is only
    predictable by recalling the needle.
    """
    for i in range(n_docs):
        length = int(rng.integers(min_len, max_len + 1))
        ex = make_passkey_example(tokenizer, length, float(rng.random()), rng, digits=digits)
        yield f"passkey-{i:06d}", tokenizer.decode(np.concatenate([ex.tokens, ex.answer]))


def build_passkey_corpus(out_dir, n_docs: int, min_len: int, max_len: int, *,
                         tokenizer: str = "byte", seed: int = 0, overwrite: bool = False):
    """A corpus (train split only) of ``passkey_documents``, to mix into training.

    ``tokenizer`` is "byte" or a corpus directory whose tokenizer to use.
    """
    import json
    import tempfile
    from pathlib import Path

    from memformers.data.corpus import build_corpus
    from memformers.data.tokenizer import ByteTokenizer, load_tokenizer

    if not 0 < min_len <= max_len or n_docs <= 0:
        raise MemformersError("passkey corpus: need docs > 0 and 0 < min length <= max length")
    tok = ByteTokenizer() if tokenizer == "byte" else load_tokenizer(tokenizer)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "passkey.jsonl"
        with open(src, "w") as f:
            for name, text in passkey_documents(tok, n_docs, min_len, max_len, rng):
                f.write(json.dumps({"name": name, "text": text}) + "\n")
        return build_corpus(out_dir, str(src), tokenizer=tokenizer, split="1,0,0",
                            overwrite=overwrite, progress=False)


class PasskeyTask(Task):
    """Fine-tuning on passkey prompts (``memformers train --task passkey``).

    Every window is one batch of prompts of a length drawn from ``task.lengths``, needle
    depths uniform in [0, 1], the loss on the answer tokens only. The prompt is fed
    segment by segment from a fresh state; only its last ``train.bptt_segments``
    segments are trained with gradient (through a differentiable memory state, e.g.
    Infini-attention, that is backpropagation through time), the earlier ones only
    fill the XL cache and the long-term memory. Evaluation is the passkey grid
    (``evaluate.passkey``) at ``task.eval_lengths`` x ``task.eval_depths``, with prompts
    never seen in training.
    """

    name = "passkey"

    def __init__(self, tokenizer: Tokenizer, *, batch_size: int, segment_len: int,
                 lengths: list[int], grad_segments: int, eval_lengths: list[int],
                 eval_depths: list[float], eval_samples: int, digits: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.tokenizer, self.segment_len, self.digits = tokenizer, segment_len, digits
        self.batch_size = batch_size // world_size  # this process's streams
        self.lengths, self.grad_segments = lengths, grad_segments
        self.eval_lengths, self.eval_depths = eval_lengths, eval_depths
        self.eval_samples, self.seed = eval_samples, seed
        for key, values in (("task.lengths", lengths), ("task.eval_lengths", eval_lengths)):
            for n in values:  # fail before training, not at the first short prompt
                try:
                    build_passkey_prompt(tokenizer, n - digits - 1, 0.5, "0" * digits)
                except MemformersError as e:
                    raise MemformersError(f"{key}: {e}") from None
        self.length_rng = np.random.default_rng(seed)  # the same on every process
        self.rng = np.random.default_rng([seed, rank])  # this process's prompts

    @classmethod
    def from_config(cls, cfg, tokenizer, *, rank: int = 0, world_size: int = 1
                    ) -> PasskeyTask:
        t = cfg.task
        return cls(tokenizer, batch_size=cfg.data.batch_size, segment_len=cfg.data.segment_len,
                   lengths=t.lengths, grad_segments=cfg.train.bptt_segments,
                   eval_lengths=t.eval_lengths, eval_depths=t.eval_depths,
                   eval_samples=t.eval_samples, digits=t.digits, seed=cfg.train.seed,
                   rank=rank, world_size=world_size)

    def next_window(self) -> list[Segment]:
        n = int(self.length_rng.choice(self.lengths))
        tokens, targets = passkey_training_batch(self.tokenizer, self.batch_size, n, self.rng,
                                                 digits=self.digits)
        return segments_of(torch.as_tensor(tokens), self.segment_len, torch.as_tensor(targets),
                           grad_segments=self.grad_segments)

    def state_dict(self) -> dict:
        return {"length_rng": self.length_rng.bit_generator.state,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.length_rng.bit_generator.state = state["length_rng"]
        self.rng.bit_generator.state = state["rng"]

    def evaluate(self, runner, *, progress: bool = True) -> dict:
        from memformers.evaluate.passkey import evaluate_passkey

        with runner.autocast:
            return evaluate_passkey(runner.model, self.tokenizer, self.eval_lengths,
                                    self.eval_depths, segment_len=self.segment_len,
                                    samples_per_cell=self.eval_samples,
                                    device=next(runner.model.parameters()).device,
                                    progress=progress, digits=self.digits,
                                    seed=10_000 + self.seed)  # prompts never trained on

    def format_result(self, result: dict) -> str:
        from memformers.evaluate.passkey import passkey_table

        return "passkey exact match:\n" + passkey_table(result)

    def write_result(self, result: dict, run_dir) -> None:
        """eval.json and its heatmap eval.png."""
        import json

        from memformers.evaluate.passkey import plot_passkey_file
        from memformers.train.checkpoint import atomic_write_text

        atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
        plot_passkey_file(run_dir / "eval.json")
