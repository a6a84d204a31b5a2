"""The infinity-former's sorting task (Martins et al., ACL 2022, section 4.1).

A sequence of T symbols from a vocabulary of 20 is drawn from a distribution that
drifts from p_initial to p_final: token j ~ (1 - r) p_initial + r p_final with
r = (j + 1) / T, both p made of random integers 1..9, normalised. The target, after
a separator, is the 20 symbols by decreasing frequency in the sequence (ties broken
by first appearance; symbols that never occur are appended in increasing order).
Counting over the whole sequence needs memory of all of it, and the drift makes the
early part matter differently from the late part.

LM layout: ``sequence + [SEP] + target`` with symbol ids 0..vocab-1 and SEP = vocab;
the model is scored on predicting the target tokens after the separator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memformers.errors import MemformersError


def random_distribution(rng: np.random.Generator, vocab: int) -> np.ndarray:
    """Random integers 1..9, normalised (the paper's p_initial / p_final)."""
    p = rng.integers(1, 10, size=vocab).astype(np.float64)
    return p / p.sum()


def drifting_sequence(length: int, p_initial: np.ndarray, p_final: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """Token j ~ (1 - r) p_initial + r p_final, r = (j + 1) / length."""
    r = (np.arange(length) + 1.0) / length  # (T,)
    p = (1.0 - r)[:, None] * p_initial[None] + r[:, None] * p_final[None]  # (T, V)
    cdf = np.cumsum(p, axis=1)
    u = rng.random(length)[:, None] * cdf[:, -1:]
    return np.minimum((u >= cdf).sum(1), len(p_initial) - 1).astype(np.int64)


def sort_by_frequency(sequence: np.ndarray, vocab: int) -> np.ndarray:
    """Symbols by decreasing count, ties by first appearance, absent ones increasing."""
    seq = np.asarray(sequence, dtype=np.int64)
    counts = np.bincount(seq, minlength=vocab)
    first = np.full(vocab, len(seq), dtype=np.int64)
    np.minimum.at(first, seq, np.arange(len(seq)))
    present = np.flatnonzero(counts > 0)
    present = present[np.lexsort((first[present], -counts[present]))]
    absent = np.flatnonzero(counts == 0)
    return np.concatenate([present, absent]).astype(np.int64)


def make_sorting_example(length: int, rng: np.random.Generator,
                         vocab: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """One (sequence (length,), target (vocab,)) pair, int64."""
    if length <= 0 or vocab <= 0:
        raise MemformersError(f"sorting: length and vocab must be positive, got {length}, {vocab}")
    p_initial = random_distribution(rng, vocab)
    p_final = random_distribution(rng, vocab)
    seq = drifting_sequence(length, p_initial, p_final, rng)
    return seq, sort_by_frequency(seq, vocab)


@dataclass
class SortingTask:
    """Sorting laid out as LM tokens: ``sequence + [SEP] + target``."""

    length: int  # T, symbols before the separator
    vocab: int = 20

    @property
    def sep(self) -> int:
        return self.vocab

    @property
    def vocab_size(self) -> int:
        return self.vocab + 1

    @property
    def total_len(self) -> int:
        return self.length + 1 + self.vocab

    def tokens(self, rng: np.random.Generator) -> np.ndarray:
        """(T + 1 + vocab,) the full example."""
        seq, target = make_sorting_example(self.length, rng, self.vocab)
        return np.concatenate([seq, [self.sep], target]).astype(np.int64)

    def lm_example(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels), both (T + vocab,): labels are the next token where it is a
        target symbol, else -100 (the sequence itself is not scored)."""
        full = self.tokens(rng)
        inputs, labels = full[:-1].copy(), full[1:].copy()
        labels[: self.length] = -100  # positions before SEP predict sequence symbols / SEP
        return inputs, labels

    def batch(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels), each (n, T + vocab)."""
        pairs = [self.lm_example(rng) for _ in range(n)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def target_accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of scored positions (labels != -100) predicted exactly."""
    keep = labels != -100
    if not keep.any():
        raise MemformersError("target_accuracy: no scored positions")
    return float((predicted[keep] == labels[keep]).mean())
