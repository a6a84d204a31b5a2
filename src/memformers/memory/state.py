"""One small interface for state that persists across segments of a stream.

A *stream* is one batch row that walks one long document segment by segment
(Memorizing Transformers, Fig. 2). Everything a model remembers about the
stream's document -- the Transformer-XL cache, a kNN memory, a compressive
memory, a continuous memory -- implements ``StreamState``:

* ``allocate(batch_size, device)``  empty state for ``batch_size`` streams
* ``reset(streams)``                clear exactly the flagged streams (new document)
* ``detach()``                      cut the autograd graph (truncated BPTT)
* ``state_tensors()`` / ``load_state_tensors()``  save/load as plain tensors
  (safetensors-friendly, so memories can be checkpointed and inspected)
* ``state_bytes_per_stream()``     footprint, for reports and up-front checks

Modules own their state; the model finds them with ``iter_stream_states``.
Writing state only happens when the forward pass is told to ``commit`` the
segment, so generation can re-run a partial segment without side effects.

Activation checkpointing (``checkpoint_segment``, ``train.checkpoint_activations``)
runs a segment's forward again during backward. That second run must read the
state the first run read and must leave the state as it is now. Two rules make
it so:

* every state lists in ``carried`` the attributes that hold it, and updates
  them out of place (rebinding, never writing into a tensor), so keeping
  references is a snapshot: the recomputation runs on the snapshot taken before
  the segment, then the current references are put back;
* state written in place (the kNN ring buffers, batch-norm statistics) skips
  its writes while ``replaying()`` and gets what it read from ``remember``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class StreamState:
    """Mixin for ``nn.Module``s that carry per-stream state across segments."""

    # The attributes holding the state (and anything else a forward rebinds). They are
    # only ever replaced, never modified in place, so references to them are a snapshot.
    carried: tuple[str, ...] = ()

    def snapshot(self) -> dict[str, Any]:
        """References to the carried attributes (no copy)."""
        return {name: getattr(self, name) for name in self.carried}

    def restore(self, snap: dict[str, Any]) -> None:
        for name, value in snap.items():
            setattr(self, name, value)

    def allocate(self, batch_size: int, device: torch.device | str) -> None:
        raise NotImplementedError

    def reset(self, streams: torch.Tensor) -> None:
        """Clear the state of streams where ``streams`` (B,) bool is True."""
        raise NotImplementedError

    def detach(self) -> None:
        """Detach carried tensors from the autograd graph (no-op if none)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def state_bytes_per_stream(self) -> int:
        raise NotImplementedError


def iter_stream_states(model: nn.Module) -> Iterator[tuple[str, StreamState]]:
    for name, module in model.named_modules():
        if isinstance(module, StreamState):
            yield name, module


def allocate_states(model: nn.Module, batch_size: int, device: torch.device | str) -> None:
    for _, s in iter_stream_states(model):
        s.allocate(batch_size, device)


def reset_states(model: nn.Module, streams: torch.Tensor) -> None:
    """Clear the flagged streams (B,) bool in every state of ``model``."""
    if bool(streams.any()):
        for _, s in iter_stream_states(model):
            s.reset(streams)


def begin_segment(model: nn.Module, tokens: torch.Tensor, new_doc: torch.Tensor | None,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """The prologue of a stream model's forward; returns the (B, L) bool mask.

    (Re)allocates state when the number of streams B changed (``model._batch_size``,
    ``model.allocate_state``), defaults the mask to all-real, and clears the streams
    whose ``new_doc`` flag is set.
    """
    B, L = tokens.shape
    if B != model._batch_size:
        model.allocate_state(B, tokens.device)
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.bool, device=tokens.device)
    if new_doc is not None:
        reset_states(model, new_doc.to(tokens.device))
    return mask


def detach_states(model: nn.Module) -> None:
    for _, s in iter_stream_states(model):
        s.detach()


def collect_state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """All stream state as ``{"<module>.<name>": tensor}`` (contiguous CPU copies)."""
    out = {}
    for mname, s in iter_stream_states(model):
        for k, t in s.state_tensors().items():
            out[f"{mname}.{k}"] = t.detach().to("cpu").contiguous()
    return out


def load_collected_state_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for mname, s in iter_stream_states(model):
        prefix = f"{mname}."
        s.load_state_tensors({k[len(prefix):]: t for k, t in tensors.items()
                              if k.startswith(prefix)})


def state_bytes_per_stream(model: nn.Module) -> int:
    return sum(s.state_bytes_per_stream() for _, s in iter_stream_states(model))


# ------------------------------------------------------------------------ activation checkpointing


def snapshot_states(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {name: s.snapshot() for name, s in iter_stream_states(model)}


def restore_states(model: nn.Module, snaps: dict[str, dict[str, Any]]) -> None:
    for name, s in iter_stream_states(model):
        s.restore(snaps[name])


class _Segment:
    """One checkpointed segment: the state it started from and what ``remember`` kept."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.before = snapshot_states(model)
        self.memo: dict[nn.Module, Any] = {}
        self.replaying = False


_active: _Segment | None = None  # a plain global: CUDA runs backward in another thread


def replaying() -> bool:
    """True while backward recomputes a checkpointed segment: skip in-place writes."""
    return _active is not None and _active.replaying


def remember(module: nn.Module, compute: Callable[[], Any]) -> Any:
    """``compute()``; a recomputation of a checkpointed segment gets the first run's value.

    For reads of state written in place, which has changed by the time backward runs
    (one call per module and segment)."""
    if _active is None:
        return compute()
    if _active.replaying:
        return _active.memo[module]
    value = _active.memo[module] = compute()
    return value


class _Use:
    """Context making ``seg`` the active segment; ``recompute``: also run it on its state."""

    def __init__(self, seg: _Segment, recompute: bool):
        self.seg, self.recompute = seg, recompute

    def __enter__(self) -> None:
        global _active
        self.outer, _active = _active, self.seg
        if self.recompute:
            self.now = snapshot_states(self.seg.model)
            restore_states(self.seg.model, self.seg.before)
            self.seg.replaying = True

    def __exit__(self, *exc) -> None:
        global _active
        _active = self.outer
        if self.recompute:
            self.seg.replaying = False
            restore_states(self.seg.model, self.now)


def checkpoint_segment(model: nn.Module, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    """``model(tokens, **kwargs)`` storing no activations: backward runs the segment again.

    The state the segment reads and writes is handled as the module docstring says,
    so gradients, the state afterwards and every side effect equal a plain forward.
    """
    seg = _Segment(model)
    return checkpoint(model, tokens, use_reentrant=False,
                      context_fn=lambda: (_Use(seg, False), _Use(seg, True)), **kwargs)
