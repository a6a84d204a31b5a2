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

``train_eval_sorting`` trains a run config's architecture from scratch on the task
(``train_sorting``) and scores it (``eval_sorting``): ``memformers sorting`` and the
``eval.sorting_lengths`` of ``memformers compare``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from memformers.config import RunConfig
from memformers.errors import MemformersError
from memformers.runner import Segment, SegmentRunner, segments_of, token_loss


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


# --------------------------------------------------------------------------- training


def sorting_segments(task, segment_len: int) -> tuple[int, list[bool]]:
    """(number of segments, which of them hold scored target positions) for one example.

    The LM example is ``T + vocab`` positions (padded to whole segments); the labels at
    positions T .. T + vocab - 1 (the sorted symbols) are the only scored ones.
    """
    L = segment_len
    n_seg = -(-(task.total_len - 1) // L)
    first, end = task.length, task.length + task.vocab  # scored label positions [first, end)
    return n_seg, [s * L < end and (s + 1) * L > first for s in range(n_seg)]


def segments_needing_grad(scored: list[bool], window: int) -> list[bool]:
    """Per segment: does its forward need autograd?

    The carried state is detached after every block of ``window`` segments (0..window-1,
    window..2*window-1, ...), so a segment's graph reaches a loss only if a scored segment
    comes at or after it in the same block. Every other segment runs under ``no_grad``:
    the same computation and state updates, without building a graph that is thrown away.
    """
    n = len(scored)
    return [any(scored[s:min(n, (s // window + 1) * window)]) for s in range(n)]


def _segments(inputs: np.ndarray, labels: np.ndarray, segment_len: int) -> list[Segment]:
    """A batch of examples as segments, each example one stream from a fresh state."""
    return segments_of(torch.as_tensor(inputs), segment_len, torch.as_tensor(labels))


def train_sorting(cfg: RunConfig, length: int, steps: int, device, autocast,
                  progress: bool = True, on_step=None):
    """(model, train seconds): the variant's architecture trained from scratch on sorting.

    Each example (T symbols, SEP, 20 targets) is one stream, streamed segment by segment
    from a fresh state; only the target tokens are scored. Same optimiser and schedule as
    LM training, ``steps`` steps, warm-up capped at a tenth of them. ``on_step(step,
    model)``, if given, runs after every optimiser step (e.g. a learning curve).
    """
    from memformers.model import MemformerLM
    from memformers.train.optim import build_optimizers, optimizer_step, set_lr

    task = SortingTask(length)
    mcfg = copy.deepcopy(cfg.model)
    mcfg.vocab_size = task.vocab_size
    tcfg = replace(cfg.train, steps=steps, warmup_steps=min(cfg.train.warmup_steps, steps // 10))
    torch.manual_seed(cfg.train.seed)
    model = MemformerLM(mcfg).to(device)
    runner = SegmentRunner(model, autocast)
    opts = build_optimizers(model, tcfg)
    B, L, window = cfg.data.batch_size, cfg.data.segment_len, cfg.train.bptt_segments
    n_seg, scored = sorting_segments(task, L)
    grad = segments_needing_grad(scored, window)
    rng = np.random.default_rng([cfg.train.seed, length, 0])
    start = time.perf_counter()
    model.train()
    for step in tqdm(range(steps), desc=f"sorting T={length}", disable=not progress,
                     leave=False):
        set_lr(opts, step, tcfg)
        inputs, labels = task.batch(B, rng)
        n_scored = max(int((labels != -100).sum()), 1)
        segments = _segments(inputs, labels, L)
        for seg, needs_grad in zip(segments, grad):
            seg.grad = needs_grad
        for w in range(0, n_seg, window):  # BPTT windows: one backward each, then detach
            total, _ = runner.loss([seg.to(device) for seg in segments[w:w + window]])
            if total.requires_grad:
                (total / n_scored).backward()
            model.detach_state()
        optimizer_step(model, opts, tcfg.grad_clip)
        if on_step is not None:
            on_step(step + 1, model)
            model.train()
    return model, time.perf_counter() - start


@torch.no_grad()
def eval_sorting(model, cfg: RunConfig, length: int, samples: int, device, autocast) -> dict:
    """Greedy (teacher-forced) next-token accuracy and loss on the target symbols of
    ``samples`` fresh examples (a different random stream from training)."""
    task = SortingTask(length)
    B, L = cfg.data.batch_size, cfg.data.segment_len
    rng = np.random.default_rng([cfg.train.seed, length, 1])
    runner = SegmentRunner(model.eval(), autocast)
    correct = scored = 0
    nll = 0.0
    for first in range(0, samples, B):
        inputs, labels = task.batch(min(B, samples - first), rng)
        for seg, logits, _ in runner.run(_segments(inputs, labels, L), device):
            nll += float(token_loss(logits, seg.targets))
            keep = seg.targets != -100
            correct += int((logits.argmax(-1)[keep] == seg.targets[keep]).sum())
            scored += int(keep.sum())
    return {"accuracy": correct / max(scored, 1), "loss": nll / max(scored, 1)}


def train_eval_sorting(cfg: RunConfig, length: int, steps: int, samples: int, device,
                       autocast, progress: bool = True, eval_every: int = 0,
                       on_curve=None) -> dict:
    """Train on the sorting task of length T (``train_sorting``), then score it
    (``eval_sorting``): {length, steps, samples, accuracy, loss, train_seconds}.

    With ``eval_every`` > 0 the same fresh examples are also scored every that many
    steps: "curve" lists {step, accuracy, loss, seconds}, and ``on_curve(curve)`` is
    called after each point (so a long run can write what it has so far).
    """
    curve: list[dict] = []
    start = time.perf_counter()

    def score(step: int, model) -> None:
        if eval_every > 0 and step % eval_every == 0 and step < steps:
            scores = eval_sorting(model, cfg, length, samples, device, autocast)
            curve.append({"step": step, **scores,
                          "seconds": round(time.perf_counter() - start, 1)})
            if on_curve is not None:
                on_curve(curve)

    model, seconds = train_sorting(cfg, length, steps, device, autocast, progress, score)
    scores = eval_sorting(model, cfg, length, samples, device, autocast)
    result = {"length": length, "steps": steps, "samples": samples, **scores,
              "train_seconds": seconds}
    if eval_every > 0:
        result["curve"] = curve + [{"step": steps, **scores,
                                    "seconds": round(time.perf_counter() - start, 1)}]
    return result
