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
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class StreamState:
    """Mixin for ``nn.Module``s that carry per-stream state across segments."""

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
