"""Optimiser parameter groups and the learning-rate schedule.

Default AdamW groups: weight matrices decay; norms, biases and every
scalar/vector parameter (gates, scales) don't.
A module may claim its own parameters by defining ``param_groups(train_cfg)``
returning dicts like ``{"params": [...], "lr": 1e-2, "weight_decay": 0.0,
"constant_lr": True, "optimizer": "adam" | "sparse_adam", "name": "..."}``;
those are taken out of the default groups (e.g. Infini-attention gates with a
higher lr, product-key memory values with constant-lr Adam or SparseAdam).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from memformers.config import TrainConfig


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    claimed: set[int] = set()
    custom: list[dict] = []
    for module in model.modules():
        hook = getattr(module, "param_groups", None)
        if callable(hook):
            for g in hook(cfg):
                params = [p for p in g["params"] if p.requires_grad and id(p) not in claimed]
                claimed.update(id(p) for p in params)
                if params:
                    custom.append({**g, "params": params})

    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) parameters come once
        if not p.requires_grad or id(p) in claimed:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    dense = [g for g in custom if g.get("optimizer", "adamw") != "sparse_adam"]
    sparse = [g for g in custom if g.get("optimizer", "adamw") == "sparse_adam"]
    for g in groups + dense:
        g.setdefault("lr", cfg.lr)
        g.setdefault("weight_decay", 0.0)
        g["base_lr"] = g["lr"]
        g.pop("optimizer", None)
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    opts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW([g for g in groups + dense if g["params"]], lr=cfg.lr,
                          betas=tuple(cfg.betas), **fused)
    ]
    for g in sparse:
        g.pop("optimizer")
        g["base_lr"] = g["lr"]
        g.pop("weight_decay", None)
        opts.append(torch.optim.SparseAdam([g], lr=g["lr"], betas=tuple(cfg.betas)))
    return opts


def optimizer_step(model: nn.Module, optimizers: list[torch.optim.Optimizer],
                   grad_clip: float) -> float:
    """Clip the global norm of the dense gradients (``grad_clip`` 0: no clipping; FSDP2's
    sharded gradients too), step every optimiser and clear the gradients; returns the
    norm before clipping."""
    from memformers.train.distributed import clip_grad_norm

    dense = [p for p in model.parameters() if p.grad is not None and not p.grad.is_sparse]
    norm = clip_grad_norm(dense, grad_clip or math.inf)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(norm)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` at ``cfg.steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(opts: list[torch.optim.Optimizer], step: int, cfg: TrainConfig) -> float:
    factor = lr_factor(step, cfg)
    for opt in opts:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] if g.get("constant_lr") else g["base_lr"] * factor
    return cfg.lr * factor
