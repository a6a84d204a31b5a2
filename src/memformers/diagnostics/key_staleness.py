"""Key staleness of the kNN memory: do keys written by older weights retrieve what fresh
ones would? (Memorizing Transformers, sec. 3.2 and 4.4: the memory is not
backpropagated into, so during training it holds keys computed by earlier weights.)

With weights theta_s now and theta_{s-D} from D steps ago, read the same held-out
segments x_1 .. x_M from a fresh state with each; K(theta) is the memory then held by a
kNN layer (the same positions in the same ring slots, since both read the same tokens).
The queries q_t of the next segment x_{M+1} come from theta_s. Per head h,

    overlap_h(D) = mean_t |top-k_h(q_t; K(theta_{s-D})) ∩ top-k_h(q_t; K(theta_s))|
                   / |top-k_h(q_t; K(theta_s))|

1 means the stale keys retrieve exactly the pairs fresh keys would; the paper's
argument for a non-differentiable memory is that keys drift slowly enough for this to
stay high. Both searches are exact (no approximate backend in the measurement).

``key_overlap`` is called by the trainer every ``train.eval_every`` steps (D = the
steps since the previous call, logged as ``key_overlap`` in metrics.jsonl and plotted
by compare reports) and by ``memformers diagnose key-staleness OLD NEW``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from memformers.memory.knn import KNNMemoryAttention
from memformers.memory.knn_store import KNNStore
from memformers.runner import Segment, SegmentRunner


def knn_layers(model: torch.nn.Module) -> dict[str, KNNMemoryAttention]:
    """The kNN memories that hold anything ({"blocks.2": module}), by block name."""
    return {name.removesuffix(".attn.memory"): m for name, m in model.named_modules()
            if isinstance(m, KNNMemoryAttention) and m.holds_memory}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights (on the CPU) to measure staleness against later."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _memories(runner: SegmentRunner, segments: list[Segment], layers, capture: bool):
    """Read ``segments[:-1]`` from a fresh state; return each layer's memory then, and (with
    ``capture``) the queries each layer searches with on the last segment."""
    device = next(runner.model.parameters()).device
    queries: dict[str, torch.Tensor] = {}
    with runner.fresh_state(segments[0].tokens.shape[0], device):
        for _ in runner.run(segments[:-1], device):
            pass
        held = {n: {k: t.clone() for k, t in m.store.state_tensors().items()}
                for n, m in layers.items()}  # the memory the last segment searches
        if capture:  # the memory's forward gets the transformed q (B, H, L, d) first
            hooks = [m.register_forward_pre_hook(
                lambda _m, args, name=name: queries.__setitem__(name, args[0].detach().float()))
                for name, m in layers.items()]
            try:
                for _ in runner.run(segments[-1:], device):
                    pass
            finally:
                for h in hooks:
                    h.remove()
    return held, queries


def _search(m: KNNMemoryAttention, tensors: dict, queries: torch.Tensor) -> torch.Tensor:
    """Exact top-k ring slots (S, L, k) of ``queries`` (B, H, L, d) in a memory's tensors."""
    store = KNNStore(dataclasses.replace(m.store.cfg, backend="exact"), m.n_heads, m.head_dim)
    store.allocate(int(tensors["count"].shape[0]), queries.device)
    store.load_state_tensors({k: v for k, v in tensors.items() if k in ("count", "keys",
                                                                         "values")})
    B, H, L, d = queries.shape
    _, slots = store.search(queries.reshape(B * H, L, d), min(m.cfg.top_k, m.cfg.capacity))
    return slots


@torch.no_grad()
def key_overlap(model: torch.nn.Module, old_weights: dict[str, torch.Tensor],
                segments: Iterable[Segment], autocast=None) -> dict[str, list[float]]:
    """Per kNN layer and head, the top-k overlap of stale (``old_weights``) against fresh
    (the model's own) keys; see the module docstring. ``segments``: at least two
    consecutive segments of the same streams, the first starting their documents. The
    model's weights and stream state are what they were when this returns."""
    segments = list(segments)
    if len(segments) < 2:
        raise ValueError("key_overlap needs at least two segments")
    layers = knn_layers(model)
    if not layers:
        return {}
    runner = SegmentRunner(model, autocast)
    now = snapshot(model)
    try:
        model.load_state_dict(old_weights)
        stale, _ = _memories(runner, segments, layers, capture=False)
    finally:
        model.load_state_dict(now)
    fresh, queries = _memories(runner, segments, layers, capture=True)
    last = segments[-1]
    real = (last.mask if last.mask is not None else torch.ones_like(last.tokens, dtype=torch.bool))
    out = {}
    for name, m in layers.items():
        if "keys" not in fresh[name] or name not in queries:
            continue  # nothing stored yet: no retrieval to compare
        q = queries[name]  # (B, H, L, d)
        B, H, L, _ = q.shape
        new = _search(m, fresh[name], q).view(B, H, L, -1)
        old = _search(m, stale[name], q).view(B, H, L, -1)
        valid = new >= 0
        same = (new[..., :, None] == old[..., None, :]).any(-1) & valid  # (B, H, L, k)
        use = real.to(q.device)[:, None, :] & valid.any(-1)  # (B, H, L) queries with a hit
        found = (same.sum(-1) / valid.sum(-1).clamp(min=1)).masked_fill(~use, 0.0)
        per_head = found.sum((0, 2)) / use.sum((0, 2)).clamp(min=1)  # (H,)
        out[name] = [round(float(x), 4) for x in per_head]
    return out
