"""Drop-in layers: each memory as one module with plain keyword arguments.

    import memformers
    attn = memformers.KNNAttention(dim=256, heads=8, capacity=65536)
    y = attn(x)            # x (B, L, dim); call again with the next segment of the same streams

Every layer walks long inputs segment by segment: a call reads the memory of the
earlier calls, then (``commit=True``) writes its own segment. Its per-stream state is
allocated on the first call for the batch it sees; a call with another batch size while
the layer holds state is an error (``reset()`` first). ``new_doc`` (B,) bool clears the
flagged streams before the segment. ``reset()``, ``detach()`` (truncated BPTT),
``save(path)`` and ``load(path)`` (safetensors) act on the layer's own state.

The attention layers are causal self-attention (the memformers ``Attention``: SDPA, an
optional Transformer-XL cache, no position encoding unless ``rotary=True``) with the
memory in the attention path, exactly as in ``MemformerLM``. The equations and defaults
of each mechanism: docs/knn.md, docs/pkm.md, docs/infini.md, docs/continuous.md,
docs/knnlm.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from memformers.errors import MemformersError
from memformers.memory.configs import (
    ContinuousConfig,
    InfiniConfig,
    KNNConfig,
    KNNLMConfig,
    PKMConfig,
)
from memformers.memory.state import (
    collect_state_tensors,
    detach_states,
    iter_stream_states,
    load_collected_state_tensors,
    reset_states,
)


class _Streams(nn.Module):
    """Lazily allocated per-stream state, reset/detach/save/load, for one layer."""

    def __init__(self):
        super().__init__()
        self.n_streams = 0  # streams the state is allocated for (memory/state.py contract)

    def allocate_state(self, batch_size: int, device=None) -> None:
        device = device or next(self.parameters(), torch.zeros(0)).device
        for _, s in iter_stream_states(self):
            s.allocate(batch_size, device)
        self.n_streams = batch_size

    def _begin(self, batch_size: int, device, new_doc: torch.Tensor | None) -> None:
        if batch_size != self.n_streams:
            if self.n_streams and self._holds_state():
                raise MemformersError(f"{type(self).__name__} holds the state of "
                                      f"{self.n_streams} streams but got a batch of "
                                      f"{batch_size}; call .reset() first")
            self.allocate_state(batch_size, device)
        if new_doc is not None:
            reset_states(self, new_doc.to(device, torch.bool))

    def _holds_state(self) -> bool:
        return any(t.numel() and bool(t.ne(0).any())
                   for t in collect_state_tensors(self).values())

    def reset(self, streams: torch.Tensor | None = None) -> None:
        """Forget every stream (default) or those flagged in ``streams`` (B,) bool."""
        if streams is None:
            self.n_streams = 0
            for _, s in iter_stream_states(self):
                s.allocate(0, next(self.parameters(), torch.zeros(0)).device)
        elif self.n_streams:
            reset_states(self, torch.as_tensor(streams, dtype=torch.bool))

    def detach(self) -> None:
        """Cut the autograd graph through the carried state (truncated BPTT)."""
        detach_states(self)

    def save(self, path: str | Path) -> None:
        """Every stream's state as one safetensors file."""
        save_file(collect_state_tensors(self), str(path),
                  metadata={"streams": str(self.n_streams)})

    def load(self, path: str | Path) -> None:
        """State saved by ``save`` from a layer built with the same arguments."""
        try:
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises several types for bad files
            raise MemformersError(f"cannot read layer state {path}: {e}") from None
        streams = max((t.shape[0] for t in tensors.values() if t.dim()), default=0)
        self.allocate_state(streams)
        load_collected_state_tensors(self, tensors)


class _MemoryAttention(_Streams):
    def __init__(self, dim: int, heads: int, dim_head: int | None, memory: nn.Module,
                 xl_cache: bool, rotary: bool, dropout: float):
        super().__init__()
        from memformers.model.attention import Attention
        from memformers.model.position import Rotary

        self.attn = Attention(dim, heads, dim_head or dim // heads, xl_cache=xl_cache,
                              memory=memory, dropout=dropout,
                              rotary=Rotary(dim_head or dim // heads) if rotary else None)

    @property
    def memory(self) -> nn.Module:
        return self.attn.memory

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                new_doc: torch.Tensor | None = None, commit: bool = True) -> torch.Tensor:
        """x (B, L, dim), mask (B, L) bool real tokens -> (B, L, dim)."""
        B, L, _ = x.shape
        self._begin(B, x.device, new_doc)
        if mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=x.device)
        return self.attn(x, mask, None, commit)


def _heads(dim: int, heads: int, dim_head: int | None) -> int:
    d = dim_head or dim // heads
    if d <= 0 or (dim_head is None and dim % heads):
        raise MemformersError(f"dim {dim} does not split into {heads} heads; pass dim_head")
    return d


class KNNAttention(_MemoryAttention):
    """Causal self-attention with a Memorizing Transformers kNN memory (docs/knn.md).

    >>> import torch, memformers
    >>> attn = memformers.KNNAttention(dim=64, heads=4, capacity=1024, top_k=8)
    >>> y = attn(torch.randn(2, 32, 64))  # segment 1: local attention, then stored
    >>> y = attn(torch.randn(2, 32, 64))  # segment 2 also retrieves from segment 1
    >>> y.shape
    torch.Size([2, 32, 64])
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int | None = None, *,
                 capacity: int = 65536, top_k: int = 32, gate_init: float = 0.0,
                 scale_init: float = 8.0, storage_dtype: str = "float16",
                 backend: str = "exact", xl_cache: bool = False, rotary: bool = False,
                 dropout: float = 0.0):
        d = _heads(dim, heads, dim_head)
        from memformers.memory.knn import KNNMemoryAttention

        cfg = KNNConfig(layers=[0], capacity=capacity, top_k=top_k, gate_init=gate_init,
                        scale_init=scale_init, storage_dtype=storage_dtype, backend=backend)
        _check_config(cfg, "knn")
        super().__init__(dim, heads, d, KNNMemoryAttention(cfg, n_heads=heads, head_dim=d,
                                                           d_model=dim),
                         xl_cache, rotary, dropout)


class InfiniAttention(_MemoryAttention):
    """Causal self-attention with Infini-attention's compressive memory (docs/infini.md).

    >>> import torch, memformers
    >>> attn = memformers.InfiniAttention(dim=64, heads=4, update="delta")
    >>> attn(torch.randn(2, 32, 64)).shape
    torch.Size([2, 32, 64])
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int | None = None, *,
                 update: str = "delta", gate_init: float = 0.0, xl_cache: bool = False,
                 rotary: bool = False, dropout: float = 0.0):
        d = _heads(dim, heads, dim_head)
        from memformers.memory.infini import InfiniMemory

        cfg = InfiniConfig(layers=[0], update=update, gate_init=gate_init)
        _check_config(cfg, "infini")
        super().__init__(dim, heads, d, InfiniMemory(cfg, n_heads=heads, head_dim=d,
                                                     d_model=dim), xl_cache, rotary, dropout)


class ContinuousAttention(_MemoryAttention):
    """Causal self-attention with the infinity-former's continuous memory
    (docs/continuous.md).

    >>> import torch, memformers
    >>> attn = memformers.ContinuousAttention(dim=64, heads=4, n_basis=64)
    >>> attn(torch.randn(2, 32, 64)).shape
    torch.Size([2, 32, 64])
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int | None = None, *,
                 n_basis: int = 256, tau: float = 0.75, sticky: bool = True,
                 xl_cache: bool = False, rotary: bool = False, dropout: float = 0.0):
        d = _heads(dim, heads, dim_head)
        from memformers.memory.continuous import ContinuousMemory

        cfg = ContinuousConfig(layers=[0], n_basis=n_basis, tau=tau, sticky=sticky)
        _check_config(cfg, "continuous")
        super().__init__(dim, heads, d, ContinuousMemory(cfg, n_heads=heads, head_dim=d,
                                                         d_model=dim), xl_cache, rotary,
                         dropout)


class ProductKeys(nn.Module):
    """The product-key memory as an FFN replacement (docs/pkm.md); stateless.

    >>> import torch, memformers
    >>> ffn = memformers.ProductKeys(dim=64, n_keys=32, heads=2, k_dim=32, top_k=8)
    >>> ffn(torch.randn(2, 16, 64)).shape
    torch.Size([2, 16, 64])
    """

    def __init__(self, dim: int, *, n_keys: int = 512, heads: int = 4, k_dim: int = 256,
                 top_k: int = 32, query_norm: str = "batchnorm", memory_plus: bool = False,
                 sparse: bool = False):
        super().__init__()
        from memformers.memory.pkm import ProductKeyMemory

        cfg = PKMConfig(layers=[0], n_keys=n_keys, heads=heads, k_dim=k_dim, top_k=top_k,
                        query_norm=query_norm, memory_plus=memory_plus, sparse=sparse)
        _check_config(cfg, "pkm")
        self.pkm = ProductKeyMemory(cfg, d_model=dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, dim) -> (B, L, dim); ``mask`` (B, L) keeps padding out of BatchNorm."""
        return self.pkm(x, mask)


class KNNLMHead(_Streams):
    """The training-free kNN-LM over a model's own hidden states (docs/knnlm.md).

    >>> import torch, memformers
    >>> head = memformers.KNNLMHead(dim=64, capacity=4096)
    >>> hidden, logits = torch.randn(2, 32, 64), torch.randn(2, 32, 100)
    >>> tokens = torch.randint(0, 100, (2, 32))
    >>> log_p = head(logits, hidden, tokens)  # log of the mixture, (B, L, V)
    >>> bool(torch.allclose(log_p.exp().sum(-1), torch.ones(2, 32), atol=1e-4))
    True
    """

    def __init__(self, dim: int, *, capacity: int = 65536, top_k: int = 64,
                 lam: float = 0.4, temperature: float = 0.035, similarity: str = "cosine",
                 min_distance: int = 0, backend: str = "auto"):
        super().__init__()
        from memformers.memory.knnlm import KNNLM

        cfg = KNNLMConfig(capacity=capacity, top_k=top_k, lam=lam, temperature=temperature,
                          similarity=similarity, min_distance=min_distance, backend=backend)
        _check_config(cfg, "knnlm")
        self.knnlm = KNNLM(cfg, dim)

    def forward(self, logits: torch.Tensor, hidden: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor | None = None, new_doc: torch.Tensor | None = None,
                commit: bool = True) -> torch.Tensor:
        """logits (B, L, V) and hidden states (B, L, dim) of ``tokens`` (B, L) -> log p."""
        B, L = tokens.shape
        self._begin(B, tokens.device, new_doc)
        if mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=tokens.device)
        return self.knnlm(logits, hidden, tokens, mask, commit)


def _check_config(cfg, name: str) -> None:
    """The one validation of ``memformers.config``, for a layer's settings."""
    from memformers.config import ModelConfig, RunConfig, validate

    model = ModelConfig(n_layers=1)
    setattr(model, name, cfg)
    validate(RunConfig(model=model))


__all__ = ["ContinuousAttention", "InfiniAttention", "KNNAttention", "KNNLMHead",
           "ProductKeys"]
