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

from memformers.errors import MemformersError

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
