"""Atomic, resumable checkpoints.

A checkpoint is a directory ``checkpoints/step_NNNNNNN`` holding
  model.safetensors   parameters
  streams.safetensors per-stream state (XL cache, memories) so resuming
                      mid-document is exact
  optim.pt            optimiser state (loaded with ``weights_only=True``)
  meta.json           step, data-stream position, RNG states, metrics
  COMMIT              written last: a directory without it is torn, never loaded
Everything is written into ``step_NNNNNNN.tmp``, fsynced, then renamed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from memformers.errors import MemformersError

COMMIT = "COMMIT"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers with shared (tied) tensors stored once."""
    out, seen = {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out


def save_model(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(model_tensors(model), str(tmp))
    _fsync_file(tmp)
    os.replace(tmp, path)


def load_model_weights(model: torch.nn.Module, path: Path, strict: bool = True) -> list[str]:
    """Load safetensors weights; returns the model's keys the file did not have."""
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise MemformersError(f"cannot read weights {path}: {e}") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # a tied tensor is saved once (model_tensors): its other names are not missing
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in tensors if k in state}
    missing = [k for k in missing if state[k].data_ptr() not in loaded]
    if unexpected:
        raise MemformersError(f"{path} does not match this model: unexpected {unexpected[:3]}")
    if strict and missing:
        raise MemformersError(f"{path} does not match this model: missing {missing[:3]}")
    return missing


def save_checkpoint(run_dir: Path, step: int, *, model, optimizers, stream_tensors: dict,
                    data_state: dict, extra: dict | None = None, keep: int = 2) -> Path:
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f"step_{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(model_tensors(model), str(tmp / "model.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file({**{f"stream.{k}": v for k, v in stream_tensors.items()},
               **{f"rng.{k}": v for k, v in rng.items()}}, str(tmp / "streams.safetensors"))
    torch.save([o.state_dict() for o in optimizers], tmp / "optim.pt")
    np_state = np.random.get_state()
    meta = {
        "step": step,
        "data_state": data_state,
        "python_random": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        **(extra or {}),
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    for f in tmp.iterdir():
        _fsync_file(f)
    (tmp / COMMIT).write_text(str(step))
    _fsync_file(tmp / COMMIT)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    for old in sorted(p for p in ckpt_root.glob("step_*") if p.suffix != ".tmp")[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step_*") if p.suffix != ".tmp" and (p / COMMIT).is_file()]
    return max(done, key=lambda p: int(p.name.split("_")[1])) if done else None


def load_checkpoint(ckpt: Path, *, model, optimizers) -> tuple[dict, dict]:
    """Restore model, optimisers and RNG; returns (meta, stream_tensors)."""
    if not (ckpt / COMMIT).is_file():
        raise MemformersError(f"checkpoint {ckpt} is incomplete (no COMMIT marker)")
    load_model_weights(model, ckpt / "model.safetensors")
    try:
        states = torch.load(ckpt / "optim.pt", weights_only=True, map_location="cpu")
        meta = json.loads((ckpt / "meta.json").read_text())
        saved = load_file(str(ckpt / "streams.safetensors"))
    except Exception as e:
        raise MemformersError(f"checkpoint {ckpt} is corrupt: {e}") from None
    for opt, st in zip(optimizers, states):
        opt.load_state_dict(st)
    torch.set_rng_state(saved["rng.torch"])
    if "rng.cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng.cuda"])
    r = meta["python_random"]
    random.setstate((r[0], tuple(r[1]), r[2]))
    s = meta["numpy_random"]
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), *s[2:]))
    streams = {k[len("stream."):]: v for k, v in saved.items() if k.startswith("stream.")}
    return meta, streams
