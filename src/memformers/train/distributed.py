"""Data-parallel training with PyTorch's own stack: torchrun, DDP and FSDP2.

``torchrun --nproc_per_node=N -m memformers train ...`` (or ``memformers train
--nproc N``) starts N processes; each reads RANK / WORLD_SIZE / LOCAL_RANK,
joins the process group (NCCL on CUDA, gloo on CPU) and uses
``cuda:LOCAL_RANK``. What is shared and what is not:

* parameters' gradients are averaged across ranks (DDP all-reduce, or FSDP2
  reduce-scatter) -- nothing else is all-reduced during training;
* per-stream memories (kNN store, compressive state, XL cache, continuous
  memory) are plain attributes, never parameters or buffers: each rank keeps
  the memories of its own streams and they are never broadcast;
* ``data.batch_size`` is the global number of streams; rank r owns streams
  r*B/N .. (r+1)*B/N - 1 (see ``data.streaming``);
* evaluation sums (loss, tokens, bytes per position bucket) are all-reduced,
  so metrics equal the single-process numbers.

Wrapping (``wrap``): ``train.parallel = "ddp"`` wraps the trainer's window
module in ``DistributedDataParallel``; ``"fsdp"`` applies FSDP2
``fully_shard`` to every block and then to the model. ``train.shard_pkm_values``
gives each product-key value table its own ``fully_shard`` unit on all ranks
(gathered only around its lookup); the rest then stays replicated through an
FSDP2 (N, 1) replicate x shard mesh, which is DDP's all-reduce semantics.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from memformers.errors import MemformersError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MemformersError(f"train.device={name} but no CUDA device is available")
    return torch.device(name)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run; ``enabled`` when a process group is up."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64); the values themselves on one process."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on at least one."""
        return bool(self.sum([float(flag)])[0]) if self.enabled else flag


def init_distributed(device_name: str) -> DistEnv:
    """The process group from torchrun's environment, or a single-process DistEnv."""
    if not launched_by_torchrun():
        return DistEnv(device=resolve_device(device_name))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device_name not in ("auto", "cpu", "cuda"):
        raise MemformersError(f"train.device={device_name}: under torchrun every rank uses "
                              "cuda:LOCAL_RANK; set train.device to auto, cuda or cpu")
    device = resolve_device("cuda" if device_name == "cuda" else device_name)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise MemformersError(f"local rank {local} has no GPU: only "
                                  f"{torch.cuda.device_count()} visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, local, device, enabled=True)


def backend() -> str:
    return dist.get_backend() if dist.is_initialized() else "none"


def close_distributed(env: DistEnv, wait_for_peers: bool = False) -> None:
    """Leave the process group. ``wait_for_peers`` (a run that ended normally on every
    rank): first a barrier, so that no rank tears its gloo group down while a peer is still
    sending; that can abort the peer ("terminate called without an active exception", seen
    on a loaded 2-core machine). After an error there is no barrier: a peer may never come."""
    if env.enabled and dist.is_initialized():
        try:
            if wait_for_peers:
                dist.barrier()
        finally:
            dist.destroy_process_group()


# --------------------------------------------------------------------------- wrapping


def is_sharded(train_cfg, env: DistEnv) -> bool:
    """FSDP2 holds (some of) the parameters: state dicts are gathered through DCP."""
    return env.enabled and (train_cfg.parallel == "fsdp" or train_cfg.shard_pkm_values)


def separately_sharded(model: nn.Module) -> list[nn.Module]:
    """The modules that modules ask to have sharded over every process on their own
    (``separately_sharded()``: product-key value tables), each once."""
    seen: dict[int, nn.Module] = {}
    for m in model.modules():
        if callable(getattr(m, "separately_sharded", None)):
            for unit in m.separately_sharded():
                seen.setdefault(id(unit), unit)
    return list(seen.values())


def wrap(window: nn.Module, model: nn.Module, train_cfg, env: DistEnv) -> nn.Module:
    """What the trainer calls for a training window: ``window`` itself or its DDP wrapper.

    ``model`` (inside ``window``) is sharded in place under FSDP2.
    """
    if not env.enabled:
        return window
    sparse = any(getattr(m, "sparse", False) for m in separately_sharded(model))
    if is_sharded(train_cfg, env):
        _fully_shard(model, train_cfg, env)
        return window
    if sparse and dist.get_backend() != "gloo":
        raise MemformersError("model.pkm.sparse=true: NCCL cannot all-reduce sparse "
                              "gradients; set model.pkm.sparse=false for multi-GPU runs")
    # A kNN gate is unused while its memories are empty, and one rank's memories can be
    # empty while another's are not: DDP must then look for unused parameters. Buffers
    # (PKM batch-norm statistics) follow rank 0; per-stream memories are not buffers.
    from memformers.memory.base import AttentionMemory

    skips = any(getattr(m, "may_skip_parameters", False) for m in model.modules()
                if isinstance(m, AttentionMemory))
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(window, device_ids=ids,
                                               find_unused_parameters=skips)


def _fully_shard(model: nn.Module, train_cfg, env: DistEnv) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    shard_all = init_device_mesh(env.device.type, (env.world_size,))
    if train_cfg.parallel == "fsdp":
        dense = shard_all
    else:  # replicate the rest: shard groups of one rank, all-reduce across replicas
        dense = init_device_mesh(env.device.type, (env.world_size, 1),
                                 mesh_dim_names=("replicate", "shard"))
    from memformers.memory.base import AttentionMemory

    for m in model.modules():  # FSDP2 reduce-scatters the gradients every rank has: all
        if isinstance(m, AttentionMemory) and m.may_skip_parameters:
            m.touch_skipped_parameters = True
    for unit in separately_sharded(model):  # before the blocks: a shared table is one unit
        fully_shard(unit, mesh=shard_all)
    if train_cfg.parallel == "fsdp":  # the model's own units (MemformerLM: its blocks)
        for unit in getattr(model, "fsdp_units", list)():
            fully_shard(unit, mesh=dense)
    fully_shard(model, mesh=dense)


@contextmanager
def gradient_sync(wrapped: nn.Module, model: nn.Module, sync: bool):
    """Accumulate gradients locally (no communication) when ``sync`` is False."""
    if not sync and isinstance(wrapped, nn.parallel.DistributedDataParallel):
        with wrapped.no_sync():
            yield
    elif not sync and hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip dense gradients to a global norm; works on plain and FSDP2 (DTensor) grads.

    Gradients on different device meshes (sharded PKM values next to replicated
    parameters) get their norms computed per mesh and combined.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for g in grads:
        by_mesh.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    sq = 0.0
    for group in by_mesh.values():
        n = torch.nn.utils.get_total_norm(group)
        sq += float(n.full_tensor() if isinstance(n, DTensor) else n) ** 2
    total = math.sqrt(sq)
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a plain tensor (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# --------------------------------------------------------------------------- state dicts


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """Whole CPU tensors of every parameter and buffer (on rank 0; {} elsewhere if sharded)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def optimizer_state(model: nn.Module, optimizers: list, sharded: bool):
    """Plain: one ``state_dict`` per optimizer. Sharded: DCP's full, name-keyed state."""
    if not sharded:
        return [o.state_dict() for o in optimizers]
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizers, options=_full_options())


def load_optimizer_state(model: nn.Module, optimizers: list, state, sharded: bool) -> None:
    if not sharded:
        for opt, st in zip(optimizers, state):
            opt.load_state_dict(st)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(model, optimizers, state,
                             options=StateDictOptions(full_state_dict=True))
