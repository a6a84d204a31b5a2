"""The interface of a long-term memory that lives inside an attention layer.

An ``AttentionMemory`` sees the layer's projected queries, keys and values
(before any position encoding, since memories carry no position information)
and the output of ordinary local attention, and returns the combined head
outputs. A memory may ask for more through ``extra_inputs``: the layer input ``x``
(the infinity-former writes it to its long-term memory) and ``aux_losses``, the list
the forward's caller collects auxiliary losses in (the memory appends its own; they are
returned to the caller, never kept on the module). It owns its per-stream state
(``StreamState``) and only writes to it when ``commit`` is True.

kNN memory, Infini-attention and the infinity-former each implement this in
one file; ``memformers.memory.build_attention_memory`` picks one per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from memformers.memory.state import StreamState


class AttentionMemory(StreamState, nn.Module):
    # True when a forward may leave some parameters without a gradient (e.g. a gate
    # that is skipped while the memory is empty): DDP then searches for unused ones.
    may_skip_parameters = False
    # Set under FSDP2, which needs a gradient (zero if need be) for every parameter on
    # every rank: the memory then keeps skipped parameters in the graph.
    touch_skipped_parameters = False
    # Keywords forward also takes: "x", the layer input (B, L, D) after the pre-norm, and
    # "aux_losses", a list to append auxiliary losses to (None when the caller wants none)
    # (continuous.py takes both); the others read only q, k, v and the local output.
    extra_inputs: tuple[str, ...] = ()
    # False: the layer skips the memory (no read, no write) and keeps its local attention,
    # with the same weights: memory off vs on for one model (``memformers.memory.memory_off``)
    enabled = True

    @property
    def holds_memory(self) -> bool:
        """False when this memory can never hold anything (e.g. kNN with capacity 0): the
        layer is then its local attention, and memory-off evaluations skip it."""
        return True

    @staticmethod
    def layer_config(cfg, layer: int):
        """The mechanism's config for one of its layers (settings given per layer are
        resolved here; the default: the same config everywhere)."""
        return cfg

    def transform_qk(
        self, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """Optionally change the q/k used by local attention AND the memory.

        Returns ``(q, k, sdpa_scale)``; ``sdpa_scale=None`` keeps 1/sqrt(d).
        """
        return q, k, None

    def forward(
        self,
        q: torch.Tensor,  # (B, H, L, d)
        k: torch.Tensor,  # (B, H, L, d)
        v: torch.Tensor,  # (B, H, L, d)
        local_out: torch.Tensor,  # (B, H, L, d) local (XL) attention output
        mask: torch.Tensor,  # (B, L) bool, real tokens
        commit: bool,
    ) -> torch.Tensor:  # (B, H, L, d)
        raise NotImplementedError

    def gate_values(self) -> torch.Tensor | None:
        """Per-head weight of the memory path in [0, 1], for reports (or None)."""
        return None

    def scale_values(self) -> torch.Tensor | None:
        """Per-head learned temperature of the memory's scores, for reports (or None)."""
        return None
