"""Long-term memory mechanisms and the registry that places them in layers.

Attention memories (one per layer at most):   knn, infini, continuous
FFN replacement:                              pkm (product-key memory)
All per-stream state implements ``memformers.memory.state.StreamState``.

Adding a mechanism = one file with an ``AttentionMemory`` subclass (its per-stream state,
``planned_state_bytes``, optimiser ``param_groups``, auxiliary losses and checkpointing
all come through the ``StreamState`` / ``AttentionMemory`` contract) and its config
dataclass as the class's ``config_class``, plus one registry line:
``register_attention_memory("name", "module:Class")``. Its layers are then configured
under ``[model.memories.name]``; the trainer, evaluation, checkpoints and
``memory.persist`` need no change (tests/test_plugin_memory.py proves it with a toy
mechanism). The built-in kNN, Infini and continuous memories have their own
``[model.knn]``-style tables (``config.ModelConfig``).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager

import torch
from torch import nn

from memformers.memory.base import AttentionMemory
from memformers.memory.state import StreamState

# config field name -> "module:Class"; imported lazily so optional deps stay optional
ATTENTION_MEMORIES = {
    "knn": "memformers.memory.knn:KNNMemoryAttention",
    "infini": "memformers.memory.infini:InfiniMemory",
    "continuous": "memformers.memory.continuous:ContinuousMemory",
}


def _load(path):
    if not isinstance(path, str):  # registered as the class itself
        return path
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)


def register_attention_memory(name: str, path) -> None:
    """Make the ``AttentionMemory`` subclass ``path`` ("module:Class", or the class) the
    mechanism ``name``, configured by ``[model.memories.<name>]`` (its ``config_class``)."""
    ATTENTION_MEMORIES[name] = path


def memory_config(model_cfg, name: str):
    """The config of mechanism ``name`` in ``model_cfg`` (None when it is not configured)."""
    return getattr(model_cfg, name, None) or model_cfg.memories.get(name)


def attention_memory_class(name: str) -> type[AttentionMemory]:
    """The ``AttentionMemory`` class registered as ``name`` (knn, infini, continuous)."""
    return _load(ATTENTION_MEMORIES[name])


def build_attention_memory(model_cfg, layer: int) -> AttentionMemory | None:
    for name, path in ATTENTION_MEMORIES.items():
        sub = memory_config(model_cfg, name)
        if sub is not None and layer in sub.layers:
            cls = _load(path)
            return cls(cls.layer_config(sub, layer), n_heads=model_cfg.n_heads,
                       head_dim=model_cfg.head_dim, d_model=model_cfg.d_model)
    return None


def configured_mechanisms(model_cfg) -> list[str]:
    """The long-term memories ``model_cfg`` places in layers, by registry name (and pkm)."""
    return [name for name in (*ATTENTION_MEMORIES, "pkm")
            if (sub := memory_config(model_cfg, name)) is not None and sub.layers]


def resolve_for_device(model_cfg, device, train_cfg) -> None:
    """Settings a mechanism chooses per device ("auto"), resolved in place before the model
    is built: today product keys' ``sparse`` (SparseAdam on one CPU process)."""
    from memformers.memory.pkm import resolve_sparse

    model_cfg.pkm = resolve_sparse(model_cfg.pkm, device, train_cfg)


class UsageObserver:
    """Handed out by ``track_usage``: ``observe(segment)`` after each segment's forward
    gives the statistics that need the segment's targets (kNN retrieval precision) the
    tokens they score against."""

    def __init__(self, stats: list):
        self.stats = stats

    def observe(self, segment) -> None:
        if not self.stats:
            return
        B, L = segment.targets.shape
        new_doc = segment.new_doc if segment.new_doc is not None else \
            torch.zeros(B, dtype=torch.bool)
        mask = segment.mask if segment.mask is not None else torch.ones(B, L, dtype=torch.bool)
        for s in self.stats:
            s.observe(segment.tokens, segment.targets, mask, new_doc)


def _retrieval_stats(model: nn.Module):
    from memformers.memory.knn_usage import KNNRetrievalStats

    for name, m in model.named_modules():
        if isinstance(getattr(m, "retrieval", None), KNNRetrievalStats):
            yield name.replace(".attn.memory", "") or "knnlm", m.retrieval


@contextmanager
def track_usage(model: nn.Module):
    """Collect the memories' usage statistics while inside the block (product keys: the
    weight each slot receives; kNN memory: how often what it retrieves predicts the next
    token, memory/knn_usage.py); ``usage_report`` then reads them. Yields a
    ``UsageObserver`` to hand each segment to after its forward."""
    from memformers.memory.pkm import track_pkm_usage

    stats = [s for _, s in _retrieval_stats(model)]
    for s in stats:
        s.reset()
        s.enabled = True
    try:
        with track_pkm_usage(model):
            yield UsageObserver(stats)
    finally:
        for s in stats:
            s.enabled = False


@contextmanager
def memory_off(model: nn.Module):
    """Inside the block every attention memory of ``model`` is skipped (no read, no write):
    the same weights with local attention only (the kNN layer keeps its normalised q/k)."""
    mods = [m for m in model.modules() if isinstance(m, AttentionMemory)]
    saved = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m, e in zip(mods, saved):
            m.enabled = e


def usage_report(model: nn.Module, world_size: int = 1) -> dict:
    """What ``track_usage`` collected, summed over ranks: {"pkm_usage": {...},
    "knn_retrieval": {...}} (the parts that apply) or {}."""
    from memformers.memory.pkm import pkm_modules, pkm_usage_report

    out = {}
    if any(True for _ in pkm_modules(model)):
        out["pkm_usage"] = pkm_usage_report(model, world_size)
    retrieval = {name: r for name, s in _retrieval_stats(model)
                 if (r := s.report(world_size)) is not None}
    if retrieval:
        out["knn_retrieval"] = retrieval
    return out


def build_ffn(model_cfg, layer: int, shared_modules: dict) -> nn.Module:
    """The layer's FFN: a product-key memory if listed in ``model.pkm.layers``.

    ``shared_modules``: one dict per model, passed to every layer's FFN at construction,
    for modules the layers share (``model.pkm.share_values``: one value table)."""
    from memformers.model.ffn import MLP

    if layer in model_cfg.pkm.layers:
        from memformers.memory.pkm import ProductKeyMemory

        return ProductKeyMemory(model_cfg.pkm, d_model=model_cfg.d_model,
                                shared_modules=shared_modules)
    return MLP(model_cfg.d_model, model_cfg.d_ff, model_cfg.ffn, model_cfg.dropout)


__all__ = ["AttentionMemory", "StreamState", "attention_memory_class", "build_attention_memory",
           "build_ffn", "configured_mechanisms", "memory_config", "memory_off",
           "register_attention_memory", "resolve_for_device", "track_usage", "usage_report"]
