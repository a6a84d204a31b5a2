"""Multi-query associative recall over a long context.

``n_pairs`` key-value sentences are scattered over a long distractor text; at the end,
``n_queries`` distinct keys are asked for in random order, each followed by its answer
(teacher forcing, the multi-query form of Zoology's MQAR, Arora et al. 2023, stretched
to long contexts like the passkey task):

    <prefix> <filler .. "The value of key QZKD is 4821. " .. filler .. pair .. filler>
    "The value of key QZKD is" " 4821" ". "  "The value of key ... is" " 0937" ". " ...

Keys are unique strings of capital letters (which the filler, whose capitals all start
words, can never contain), values are random digit strings. Only the answer tokens are
targets, so the loss and the accuracy measure recall and nothing else. Pieces are
tokenised separately and concatenated, so the length is exact for any tokenizer.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

from memformers.errors import MemformersError
from memformers.tasks.passkey import Tokenizer, filler_tokens

PREFIX = "Remember the value of every key hidden in the text below. "
PAIR = "The value of key {key} is {value}. "
QUERY = "The value of key {key} is"
ANSWER = " {value}"
SEPARATOR = ". "


@dataclass
class RecallExample:
    tokens: np.ndarray  # (length_tokens,) int64: prefix, context, then queries with answers
    targets: np.ndarray  # (length_tokens,) int64: next-token label on answer tokens, else -100
    answer_spans: list[tuple[int, int]]  # [start, end) of each query's answer in ``tokens``
    keys: list[str]  # all n_pairs keys, in context order
    values: list[str]  # their values
    queries: list[int]  # index into ``keys`` of each query, in question order
    pair_starts: list[int]  # token index of each pair sentence, in context order
    context_end: int  # first token of the query section


def _ids(tokenizer: Tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def random_keys(rng: np.random.Generator, n: int, key_len: int = 4) -> list[str]:
    """``n`` distinct strings of ``key_len`` capital letters."""
    if n > 26**key_len // 2:
        raise MemformersError(f"recall: {n} pairs need longer keys than key_len={key_len}")
    letters = np.array(list(string.ascii_uppercase))
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < n:
        k = "".join(rng.choice(letters, key_len))
        if k not in seen:
            seen.add(k)
            keys.append(k)
    return keys


def make_recall_example(
    tokenizer: Tokenizer,
    length_tokens: int,
    n_pairs: int,
    n_queries: int,
    rng: np.random.Generator,
    *,
    key_len: int = 4,
    value_digits: int = 4,
) -> RecallExample:
    """A recall example of exactly ``length_tokens`` tokens (see the module docstring)."""
    if not 1 <= n_queries <= n_pairs:
        raise MemformersError(
            f"recall needs 1 <= n_queries <= n_pairs, got n_queries={n_queries}, n_pairs={n_pairs}")
    keys = random_keys(rng, n_pairs, key_len)
    values = ["".join(map(str, rng.integers(0, 10, value_digits))) for _ in range(n_pairs)]
    queries = [int(i) for i in rng.permutation(n_pairs)[:n_queries]]

    prefix = _ids(tokenizer, PREFIX)
    pairs = [_ids(tokenizer, PAIR.format(key=k, value=v)) for k, v in zip(keys, values)]
    sep = _ids(tokenizer, SEPARATOR)
    asked = [(_ids(tokenizer, QUERY.format(key=keys[i])),
              _ids(tokenizer, ANSWER.format(value=values[i]))) for i in queries]
    fixed = len(prefix) + sum(map(len, pairs)) + sum(len(q) + len(a) + len(sep) for q, a in asked)
    if length_tokens < fixed:
        raise MemformersError(f"recall length {length_tokens} is too short: {n_pairs} pairs and "
                              f"{n_queries} queries need at least {fixed} tokens")
    filler, bounds = filler_tokens(tokenizer, length_tokens - fixed)
    cuts = np.sort(rng.choice(np.asarray(bounds), n_pairs))  # sentence boundaries, may repeat

    parts, pair_starts, pos, prev = [prefix], [], len(prefix), 0
    for cut, pair in zip(cuts, pairs):
        parts += [filler[prev:cut], pair]
        pos += cut - prev
        pair_starts.append(pos)
        pos += len(pair)
        prev = cut
    parts.append(filler[prev:])
    context_end = pos + len(filler) - prev

    spans, pos = [], context_end
    for q, a in asked:
        parts += [q, a, sep]
        spans.append((pos + len(q), pos + len(q) + len(a)))
        pos += len(q) + len(a) + len(sep)
    tokens = np.concatenate(parts)
    targets = np.full(len(tokens), -100, dtype=np.int64)
    for s, e in spans:
        targets[s - 1:e - 1] = tokens[s:e]
    return RecallExample(tokens=tokens, targets=targets, answer_spans=spans, keys=keys,
                         values=values, queries=queries, pair_starts=pair_starts,
                         context_end=context_end)


def recall_training_example(
    tokenizer: Tokenizer,
    length_tokens: int,
    n_pairs: int,
    n_queries: int,
    rng: np.random.Generator,
    **kw,
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, targets), both exactly ``length_tokens`` long; targets only on answers."""
    ex = make_recall_example(tokenizer, length_tokens, n_pairs, n_queries, rng, **kw)
    return ex.tokens, ex.targets


def recall_training_batch(
    tokenizer: Tokenizer,
    batch_size: int,
    length_tokens: int,
    n_pairs: int,
    n_queries: int,
    rng: np.random.Generator,
    **kw,
) -> tuple[np.ndarray, np.ndarray]:
    """(B, length_tokens) tokens and targets."""
    pairs = [recall_training_example(tokenizer, length_tokens, n_pairs, n_queries, rng, **kw)
             for _ in range(batch_size)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def recall_accuracy(predictions: np.ndarray, example: RecallExample) -> float:
    """Fraction of queries whose whole answer is predicted (teacher-forced).

    ``predictions[i]`` is the model's next-token choice (argmax) at ``tokens[i]``.
    """
    hits = [bool(np.array_equal(predictions[s - 1:e - 1], example.tokens[s:e]))
            for s, e in example.answer_spans]
    return float(np.mean(hits))
