"""One small interface for state that persists across segments of a stream.

A *stream* is one batch row that walks one long document segment by segment
(Memorizing Transformers, Fig. 2). Everything a model remembers about the
stream's document -- the Transformer-XL cache, a kNN memory, a compressive
memory, a continuous memory -- implements ``StreamState``:

* ``allocate(batch_size, device)``  empty state for ``batch_size`` streams
* ``reset(streams)``                clear exactly the flagged streams (new document)
* ``detach()``                      cut the autograd graph (truncated BPTT)
* ``state_tensors()`` / ``load_state_tensors()``  save/load as plain tensors
  (safetensors-friendly, so memories can be checkpointed and inspected), every
  one with the stream as its first dimension; zeros are the empty state
* ``state_bytes_per_stream()``     footprint of the state held now
* ``storage_settings()`` / ``adopt_storage_settings()`` / ``tokens_written()``  what a
  saved memory records (``memory.persist``)
* ``planned_state_bytes(segment_len, itemsize)``  footprint once a stream is under way,
  known before anything is allocated (for the memory budget and the state report), and
  ``state_kind`` / ``describe_state(...)`` to name it in that report

Modules own their state; the model finds them with ``iter_stream_states``. A model that
walks streams (``MemformerLM``, ``hf.lm.HFMemoryLM``) has ``allocate_state(B, device)`` and
a public ``n_streams`` (the B its state is allocated for); its forward starts with
``begin_segment``, which re-allocates when a batch of another size comes.
Writing state only happens when the forward pass is told to ``commit`` the
segment, so generation can re-run a partial segment without side effects.

``collect_state_tensors`` / ``load_collected_state_tensors`` move the state of a
whole model, or of chosen streams: the state of stream i of one model can
continue as stream j of another (``memformers.memory.persist`` puts it on disk).

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

from memformers.errors import MemformersError


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

    def adopt_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Like ``load_state_tensors``, but may keep ``tensors`` as its own buffers instead of
        copying them (e.g. a memory-mapped file that is then read only where searched)."""
        self.load_state_tensors(tensors)

    def state_bytes_per_stream(self) -> int:
        raise NotImplementedError

    # what the state report calls this state (memories: their registry name)
    state_kind = "state"

    def planned_state_bytes(self, segment_len: int, itemsize: int = 4) -> int:
        """Bytes per stream once a stream is under way (``segment_len`` tokens per segment,
        activations of ``itemsize`` bytes); known from the configuration alone, before
        any state is allocated (works on the meta device)."""
        return self.state_bytes_per_stream()

    def describe_state(self, segment_len: int, itemsize: int = 4) -> str:
        """How ``planned_state_bytes`` adds up, for one module, in words."""
        return f"{self.planned_state_bytes(segment_len, itemsize):,} B"

    # persistence (memory/persist.py): the sizes a saved state only fits under
    def storage_settings(self) -> dict:
        """Settings the state's tensors are shaped by (e.g. a kNN ring's capacity and
        dtype), saved with a memory; {} when the config alone shapes them."""
        return {}

    def adopt_storage_settings(self, settings: dict) -> None:
        """Empty state shaped by saved ``storage_settings`` (loading a whole memory)."""

    def describe_settings(self, settings: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in settings.items())

    def tokens_written(self) -> list[int] | None:
        """Tokens written per stream since its last reset, where the state counts them."""
        return None


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

    (Re)allocates state when the number of streams B changed (``model.n_streams``,
    ``model.allocate_state``), defaults the mask to all-real, and clears the streams
    whose ``new_doc`` flag is set.
    """
    B, L = tokens.shape
    if B != model.n_streams:
        model.allocate_state(B, tokens.device)
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.bool, device=tokens.device)
    if new_doc is not None:
        reset_states(model, new_doc.to(tokens.device))
    return mask


def detach_states(model: nn.Module) -> None:
    for _, s in iter_stream_states(model):
        s.detach()


def stream_count(model: nn.Module) -> int:
    """Streams the model's state is allocated for (``model.n_streams`` where the model
    keeps it, else read off the state tensors, e.g. of a Hugging Face retrofit)."""
    if hasattr(model, "n_streams"):
        return model.n_streams
    return max((t.shape[0] for _, s in iter_stream_states(model)
                for t in s.state_tensors().values()), default=0)


def collect_state_tensors(model: nn.Module, streams: list[int] | None = None
                          ) -> dict[str, torch.Tensor]:
    """The stream state as ``{"<module>.<name>": tensor}`` (contiguous CPU copies): of every
    stream, or of ``streams`` only (in that order)."""
    out = {}
    for mname, s in iter_stream_states(model):
        for k, t in s.state_tensors().items():
            t = t.detach() if streams is None else t.detach()[streams]
            out[f"{mname}.{k}"] = t.to("cpu").contiguous()
    return out


def _padded(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``t`` in the corner of a zero (empty state) tensor of ``shape``."""
    out = torch.zeros(shape, dtype=dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t.detach().to("cpu", dtype)
    return out


def _place_streams(current: dict[str, torch.Tensor], saved: dict[str, torch.Tensor],
                   into: list[int], n_streams: int) -> dict[str, torch.Tensor]:
    """Every stream's tensors of one module: ``current`` with streams ``into`` replaced by
    the rows of ``saved``. A tensor one side lacks is the empty state there (zeros); sizes
    that differ (a kNN ring filled further, ...) are padded with zeros."""
    out = {}
    for name in [*current, *(k for k in saved if k not in current)]:
        cur, new = current.get(name), saved.get(name)
        present = [t for t in (cur, new) if t is not None]
        if len({t.dim() for t in present}) > 1:
            raise MemformersError(f"saved stream state '{name}' of shape {tuple(new.shape)} "
                                  f"does not fit this model's {tuple(cur.shape)}")
        dtype = present[0].dtype  # this model's own, where it has the tensor
        size = tuple(max(n) for n in zip(*(t.shape[1:] for t in present)))
        merged = (_padded(cur, (n_streams, *size), dtype) if cur is not None
                  else torch.zeros((n_streams, *size), dtype=dtype))
        merged[into] = (_padded(new, (len(into), *size), dtype) if new is not None
                        else torch.zeros((len(into), *size), dtype=dtype))
        out[name] = merged
    return out


def load_collected_state_tensors(model: nn.Module, tensors: dict[str, torch.Tensor],
                                 into: list[int] | None = None, adopt: bool = False) -> None:
    """Load ``collect_state_tensors``' output: as the whole state (``into`` None), or as the
    state of streams ``into`` (one per saved stream) while every other stream keeps its own.

    ``adopt``: a whole state may be kept as the modules' buffers (``adopt_state_tensors``).
    """
    n_streams = stream_count(model) if into is not None else 0
    if into is not None and not all(0 <= i < n_streams for i in into):
        raise MemformersError(f"streams {into} do not exist: the model holds state for "
                              f"{n_streams} streams (allocate them first, e.g. "
                              "model.allocate_state(B))")
    for mname, s in iter_stream_states(model):
        prefix = f"{mname}."
        saved = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        if into is not None:
            s.load_state_tensors(_place_streams(s.state_tensors(), saved, into, n_streams))
        elif adopt:
            s.adopt_state_tensors(saved)
        else:
            s.load_state_tensors(saved)


def state_bytes_per_stream(model: nn.Module) -> int:
    return sum(s.state_bytes_per_stream() for _, s in iter_stream_states(model))


def planned_state_bytes(model: nn.Module, segment_len: int, itemsize: int = 4) -> int:
    """Per-stream state bytes of every state of ``model`` once streams are under way."""
    return sum(s.planned_state_bytes(segment_len, itemsize) for _, s in iter_stream_states(model))


def state_report(model: nn.Module, segment_len: int, n_streams: int, itemsize: int = 4) -> str:
    """One line: the per-stream state bytes of each kind of state, printed before training
    (each module's ``planned_state_bytes`` and ``describe_state``)."""
    kinds: dict[str, list[StreamState]] = {}
    for _, s in iter_stream_states(model):
        kinds.setdefault(s.state_kind, []).append(s)
    if not kinds:
        return "per-stream state: none"
    parts, total = [], 0
    for kind, mods in kinds.items():
        size = sum(s.planned_state_bytes(segment_len, itemsize) for s in mods)
        n = f"{len(mods)} layer{'s' if len(mods) > 1 else ''}"
        parts.append(f"{kind} {size:,} B ({n} x {mods[0].describe_state(segment_len, itemsize)})")
        total += size
    return (f"per-stream state: {'; '.join(parts)}; in all {total:,} B per stream, "
            f"{total * n_streams:,} B for {n_streams} streams")


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
