"""The segment runner: the one loop that feeds a model its streams, segment by segment.

A batch row is a *stream*: one long document read ``L`` tokens at a time, with every
piece of per-stream state (XL cache, long-term memories) carried from segment to
segment (``memory.state``). Training, evaluation, generation, the tasks and the
diagnostics all walk streams this way, so the walk is written once, here:

* ``Segment``            one step of every stream: tokens, targets, new-document
                         flags, padding mask, and whether to build a graph / commit;
* ``segments_of``        a batch of whole, short streams (B, T) cut into segments;
* ``SegmentRunner.run``  THE loop: each segment's forward under autocast, with or
                         without autograd, optionally with activation checkpointing
                         (``memory.state.checkpoint_segment``), yielding the logits;
* ``SegmentRunner.loss`` one BPTT window: summed token loss (+ auxiliary losses) and
                         the number of scored tokens; the caller backpropagates and
                         detaches the state (``model.detach_state()``) after it;
* ``SegmentRunner.fresh_state``  run on freshly allocated state, then give back the
                         state the model held (evaluation between training steps).

Truncated BPTT: gradients flow through carried state inside one window (one call of
``loss``); the caller detaches the state after its backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from memformers.memory.state import (
    checkpoint_segment,
    collect_state_tensors,
    iter_stream_states,
    load_collected_state_tensors,
    stream_count,
)

IGNORE_INDEX = -100


@dataclass
class Segment:
    """One segment of every stream of a batch."""

    tokens: torch.Tensor  # (B, L) int64 inputs
    targets: torch.Tensor | None = None  # (B, L) int64 next tokens, -100 = not scored
    mask: torch.Tensor | None = None  # (B, L) bool: real tokens (None = all)
    new_doc: torch.Tensor | None = None  # (B,) bool: these streams start a new document
    # build the autograd graph (False: no_grad, the same state updates)
    grad: bool = field(default=True, kw_only=True)
    commit: bool = field(default=True, kw_only=True)  # write the segment into the state

    def to(self, device: torch.device | str):
        """The segment (of its own class) with every tensor on ``device``."""
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=True)
                                for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def n_targets(self) -> torch.Tensor:
        """Scored positions, as a 0-d tensor on the segment's device (no host sync)."""
        if self.targets is None:
            return torch.zeros((), dtype=torch.long, device=self.tokens.device)
        return (self.targets != IGNORE_INDEX).sum()


def segments_of(tokens: torch.Tensor, segment_len: int, targets: torch.Tensor | None = None,
                *, grad_segments: int | None = None, new_doc: bool = True) -> list[Segment]:
    """(B, T) whole streams as ceil(T / L) consecutive segments.

    The last segment is padded (mask False, targets -100) when ``T`` is not a multiple
    of ``segment_len``. ``new_doc``: the first segment starts every stream's document
    (its state is reset). ``grad_segments``: only the last that many segments build a
    graph (the earlier ones only fill the state); None = all of them.
    """
    B, T = tokens.shape
    L = segment_len
    n = -(-T // L)
    pad = n * L - T
    mask = torch.ones(B, n * L, dtype=torch.bool, device=tokens.device)
    if pad:
        mask[:, T:] = False
        tokens = F.pad(tokens, (0, pad))
        if targets is not None:
            targets = F.pad(targets, (0, pad), value=IGNORE_INDEX)
    first = torch.full((B,), new_doc, dtype=torch.bool, device=tokens.device)
    n_free = 0 if grad_segments is None else max(0, n - grad_segments)
    return [Segment(tokens[:, s * L:(s + 1) * L],
                    None if targets is None else targets[:, s * L:(s + 1) * L],
                    mask[:, s * L:(s + 1) * L] if pad else None,
                    first if s == 0 else torch.zeros_like(first),
                    grad=s >= n_free)
            for s in range(n)]


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum"
               ) -> torch.Tensor:
    """Cross-entropy over (B, L, V) logits; targets -100 are ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


class SegmentRunner:
    """Runs segments through ``model``: autocast, grad / no-grad, activation checkpointing.

    ``autocast``: a context manager entered around every forward (``autocast_for``);
    ``checkpoint_activations``: segments with a graph keep no activations for backward,
    which runs them again (activation memory of one segment, for about one more forward).
    """

    def __init__(self, model: torch.nn.Module, autocast=None,
                 checkpoint_activations: bool = False):
        self.model = model
        self.autocast = autocast if autocast is not None else nullcontext()
        self.checkpoint_activations = checkpoint_activations

    def forward(self, seg: Segment, call: Callable[[Segment], object] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """One segment: (logits (B, L, V), the sum of this forward's auxiliary losses, which
        the model returns through its ``aux_losses`` list when the segment is trained).

        ``call(segment)``, if given, replaces the model's forward (same autocast and grad
        mode), for a walk that needs more than logits, e.g. the kNN-LM tuner's hidden
        states and neighbours; its result takes the logits' place and there are no
        auxiliary losses."""
        grad = seg.grad and torch.is_grad_enabled()
        if call is not None:
            with torch.set_grad_enabled(grad), self.autocast:
                return call(seg), 0.0
        kwargs = dict(new_doc=seg.new_doc, mask=seg.mask, commit=seg.commit)
        aux: list[torch.Tensor] = []
        if grad:
            kwargs["aux_losses"] = aux
        with torch.set_grad_enabled(grad), self.autocast:
            if grad and self.checkpoint_activations:
                logits = checkpoint_segment(self.model, seg.tokens, **kwargs)
            else:
                logits = self.model(seg.tokens, **kwargs)
        return logits, sum(aux) if aux else 0.0

    def run(self, segments: Iterable[Segment], device: torch.device | str | None = None,
            call: Callable[[Segment], object] | None = None
            ) -> Iterator[tuple[Segment, torch.Tensor, torch.Tensor | float]]:
        """The segment loop: ``(segment, logits, auxiliary losses)`` for each in turn
        (segments moved to ``device`` first, if given; ``call``: see ``forward``)."""
        for seg in segments:
            if device is not None:
                seg = seg.to(device)
            logits, aux = self.forward(seg, call)
            yield seg, logits, aux

    def loss(self, segments: Iterable[Segment], aux_scale: float = 1.0,
             on_logits: Callable[[Segment, torch.Tensor], None] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One BPTT window: (summed token loss + ``aux_scale`` x auxiliary losses, scored
        tokens as a 0-d tensor). Segments without targets, or without a graph, only
        advance the state (their scored tokens are counted, not lost).
        ``on_logits(segment, logits)`` sees every segment's logits (e.g. for accuracy)."""
        total: torch.Tensor | float = 0.0
        n_targets = None
        device = None
        for seg, logits, aux in self.run(segments):
            if on_logits is not None:
                on_logits(seg, logits)
            n, device = seg.n_targets(), logits.device
            n_targets = n if n_targets is None else n_targets + n
            if seg.targets is not None and seg.grad:
                total = total + token_loss(logits, seg.targets) + aux_scale * aux
        if n_targets is None:
            n_targets = torch.zeros((), dtype=torch.long)
        if not isinstance(total, torch.Tensor):  # nothing was scored
            total = torch.zeros((), device=device)
        return total, n_targets

    @contextmanager
    def fresh_state(self, batch_size: int, device: torch.device | str | None = None):
        """Run the block on fresh state for ``batch_size`` streams (eval mode, no autograd),
        then give the model back its mode and the state it held before."""
        model = self.model
        held = stream_count(model)
        saved = collect_state_tensors(model) if held else None
        was_training = model.training
        device = device if device is not None else next(model.parameters()).device
        model.eval()
        try:
            model.allocate_state(batch_size, device)
            with torch.no_grad():
                yield self
        finally:
            model.train(was_training)
            if saved is not None:
                model.allocate_state(held, device)
                load_collected_state_tensors(model, saved)
            elif any(True for _ in iter_stream_states(model)):
                model.allocate_state(max(held, 1), device)
