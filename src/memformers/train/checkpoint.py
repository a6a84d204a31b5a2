"""Atomic, resumable checkpoints, written by one process or by every rank of a run.

A checkpoint is a directory ``checkpoints/step_NNNNNNN`` holding
  model.safetensors         parameters (rank 0; gathered whole under FSDP2)
  optim.pt                  optimiser state (rank 0; loaded with ``weights_only=True``)
  meta.json                 step, data-stream position (global: the same on every
                            rank), world size, what was saved (rank 0)
  streams-rank{r}.safetensors  written by rank r: its RNG states and, when
                            ``train.save_stream_state``, the per-stream state of its
                            streams (XL cache, memories) so resuming mid-document is exact
  COMMIT                    written last, by rank 0 after every rank has finished:
                            a directory without it is torn, never loaded. It holds the
                            sha256 of every other file, checked before loading: a
                            corrupt latest checkpoint is skipped (one warning line) for
                            the previous good one
Everything is written into ``step_NNNNNNN.tmp``, fsynced, then renamed. With
several ranks the run directory must be on a filesystem they all see.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
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


def lock_run_dir(run_dir: Path):
    """Take the run directory's exclusive lock (``run_dir/.lock``, ``fcntl.flock``) for the
    life of the returned file; a second process gets a one-line error naming the holder.
    Also checks, before any work, that the directory can be written."""
    import fcntl

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / ".lock", "a+")
    except OSError as e:
        raise MemformersError(f"cannot write to run directory {run_dir}: "
                              f"{e.strerror or e}") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise MemformersError(f"run directory {run_dir} is in use by another memformers "
                              f"process (pid {holder})") from None
    try:
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        f.close()
        raise MemformersError(f"cannot write to run directory {run_dir}: "
                              f"{e.strerror or e}") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def record_config_changes(run_dir: Path, saved: dict, now: dict, step: int) -> list[dict]:
    """Settings changed on ``--resume``: appended to ``run_dir/changes.jsonl`` as
    {"step", "key", "old", "new"} lines, and ``config.json`` rewritten with the new values
    (so it always says what the run is doing now). Returns the changes."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            out.update(flat(v, key) if isinstance(v, dict) else {key: v})
        return out

    old, new = flat(saved), flat(now)
    changes = [{"step": step, "key": k, "old": old.get(k), "new": new.get(k)}
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changes:
        with open(run_dir / "changes.jsonl", "a") as f:
            f.writelines(json.dumps(c) + "\n" for c in changes)
        atomic_write_text(run_dir / "config.json", json.dumps(now, indent=2))
    return changes


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of ``metrics.jsonl`` after ``step`` (a crash after the checkpoint left
    them; the resumed run writes those steps again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a torn last line
    atomic_write_text(path, "".join(x + "\n" for x in keep))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def model_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's state dict as contiguous CPU tensors, shared (tied) tensors stored once."""
    out, seen = {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Weights written atomically, with their sha256 beside them (``NAME.sha256``), which
    ``load_model_weights`` checks."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    _fsync_file(tmp)
    atomic_write_text(_digest_file(path), _sha256(tmp) + "\n")
    os.replace(tmp, path)


def save_model(model: torch.nn.Module, path: Path) -> None:
    save_tensors(model_tensors(model.state_dict()), path)


def load_model_weights(model: torch.nn.Module, path: Path, strict: bool = True,
                       skip: set[str] = frozenset()) -> list[str]:
    """Load safetensors weights; returns the model's keys the file did not have. Weights
    saved with ``save_tensors`` must match their recorded sha256."""
    digest = _digest_file(path)
    if digest.is_file() and path.is_file() and \
            digest.read_text().strip() != _sha256(path):
        raise MemformersError(f"{path} does not match its recorded sha256 ({digest.name}): "
                              f"the file is damaged")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise MemformersError(f"cannot read weights {path}: {e}") from None
    tensors = {k: v for k, v in tensors.items() if k not in skip}  # left at the model's init
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # a tensor of another shape: other sizes, another config
        first = next((x.strip() for x in str(e).splitlines() if "size mismatch" in x),
                     str(e).strip().splitlines()[0])
        raise MemformersError(f"{path} does not match this model ({first.rstrip('.')}); "
                              f"load it with the config it was trained with") from None
    # a tied tensor is saved once (model_tensors): its other names are not missing
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in tensors if k in state}
    missing = [k for k in missing if state[k].data_ptr() not in loaded]
    if unexpected:
        raise MemformersError(f"{path} does not match this model: unexpected {unexpected[:3]}")
    if strict and missing:
        raise MemformersError(f"{path} does not match this model: missing {missing[:3]}")
    return missing


def _rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"streams-rank{rank}.safetensors"


def save_checkpoint(run_dir: Path, step: int, *, rank: int = 0, barrier=lambda: None,
                    model_state: dict | None, optim_state, stream_tensors: dict,
                    meta: dict, keep: int = 2) -> Path:
    """Write one checkpoint; every rank calls it (``barrier`` synchronises them).

    Rank 0 passes ``model_state``, ``optim_state`` and ``meta`` (step, data
    state, ...); every rank passes the stream tensors of its own streams.
    """
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f"step_{step:07d}.tmp"
    try:
        _write_checkpoint(ckpt_root, final, tmp, step, rank, barrier, model_state,
                          optim_state, stream_tensors, meta, keep)
    except OSError as e:  # disk full, quota, permissions: the last good checkpoint stays
        shutil.rmtree(tmp, ignore_errors=True)
        good = latest_checkpoint(run_dir, verify=False)
        raise MemformersError(f"cannot write checkpoint {final.name}: "
                              f"{e.strerror or e}; partial files removed, last good "
                              f"checkpoint: {good.name if good else 'none'}") from None
    barrier()  # nobody goes on (or exits) before the checkpoint is committed
    return final


def _write_checkpoint(ckpt_root: Path, final: Path, tmp: Path, step: int, rank: int, barrier,
                      model_state, optim_state, stream_tensors: dict, meta: dict,
                      keep: int) -> None:
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    r, np_state = random.getstate(), np.random.get_state()
    host_rng = {"python_random": [r[0], list(r[1]), r[2]],
                "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    save_file({**{f"stream.{k}": v for k, v in stream_tensors.items()},
               **{f"rng.{k}": v for k, v in rng.items()}}, str(_rank_file(tmp, rank)),
              metadata={"host_rng": json.dumps(host_rng)})
    _fsync_file(_rank_file(tmp, rank))
    if rank == 0:
        save_file(model_tensors(model_state), str(tmp / "model.safetensors"))
        torch.save(optim_state, tmp / "optim.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}))
        for name in ("model.safetensors", "optim.pt", "meta.json"):
            _fsync_file(tmp / name)
    barrier()  # every rank's file is on disk
    if rank == 0:
        digests = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / COMMIT).write_text(json.dumps({"step": step, "sha256": digests}))
        _fsync_file(tmp / COMMIT)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        for old in sorted(p for p in ckpt_root.glob("step_*") if p.suffix != ".tmp")[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why committed checkpoint ``ckpt`` must not be loaded (a file missing or failing its
    recorded sha256), or None. Checkpoints written before checksums pass unchecked."""
    try:
        record = json.loads((ckpt / COMMIT).read_text())
    except (OSError, json.JSONDecodeError):
        return "its COMMIT marker is unreadable"
    if not isinstance(record, dict):
        return None  # an older checkpoint: COMMIT holds only the step
    for name, digest in record.get("sha256", {}).items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} fails its sha256"
    return None


def latest_checkpoint(run_dir: Path, verify: bool = True) -> Path | None:
    """The newest committed checkpoint whose files pass their checksums (``verify``); a
    newer corrupt one is skipped with one warning line on stderr."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step_*") if p.suffix != ".tmp" and (p / COMMIT).is_file()]
    for ckpt in sorted(done, key=lambda p: int(p.name.split("_")[1]), reverse=True):
        problem = checkpoint_problem(ckpt) if verify else None
        if problem is None:
            return ckpt
        print(f"warning: checkpoint {ckpt} is corrupt ({problem}); using an older one",
              file=sys.stderr)
    return None


def read_checkpoint(ckpt: Path) -> tuple[dict, object]:
    """(meta, optimiser state) of a committed checkpoint."""
    if not (ckpt / COMMIT).is_file():
        raise MemformersError(f"checkpoint {ckpt} is incomplete (no COMMIT marker)")
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        optim = torch.load(ckpt / "optim.pt", weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise MemformersError(f"checkpoint {ckpt}: optim.pt holds objects other than tensors "
                              f"and plain containers; refused (memformers never unpickles "
                              f"code)") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MemformersError(f"checkpoint {ckpt} is corrupt: {first}") from None
    meta.setdefault("world_size", 1)  # checkpoints written before multi-process runs
    return meta, optim


def load_rank_state(ckpt: Path, rank: int) -> dict[str, torch.Tensor] | None:
    """Restore this rank's RNG states; returns its stream tensors (None: no file)."""
    path = _rank_file(ckpt, rank)
    if not path.is_file() and rank == 0 and (ckpt / "streams.safetensors").is_file():
        path = ckpt / "streams.safetensors"  # written before multi-process runs
    if not path.is_file():
        return None
    try:
        saved = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            host = (f.metadata() or {}).get("host_rng")
    except Exception as e:
        raise MemformersError(f"checkpoint file {path} is corrupt: {e}") from None
    torch.set_rng_state(saved["rng.torch"])
    if "rng.cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng.cuda"])
    if host is None:  # older checkpoints kept the host RNG states in meta.json
        host = (ckpt / "meta.json").read_text()
    host_rng = json.loads(host)
    r = host_rng["python_random"]
    random.setstate((r[0], tuple(r[1]), r[2]))
    s = host_rng["numpy_random"]
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), *s[2:]))
    return {k[len("stream."):]: v for k, v in saved.items() if k.startswith("stream.")}
