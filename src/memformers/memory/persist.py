"""Save and load what a model remembers: every stream, or one stream to continue elsewhere.

One API for every model with stream state -- ``MemformerLM`` (XL caches, kNN,
Infini-attention and continuous memories) and Hugging Face retrofits
(``memformers.hf``). A memory on disk is a directory::

    memory.json          manifest: streams saved, the state modules, kNN capacity and
                         dtype, tokens written per stream, the fingerprint of the weights
    memory.safetensors   "<module>.<name>" tensors, each with the stream first (the
                         ``state_tensors`` of ``memformers.memory.state``)

``save_memory(model, dir)`` / ``load_memory(model, dir)`` move the whole state; with
``stream=i`` / ``stream=j`` one stream is saved, and loaded into stream j of a model
whose other streams keep their own state, e.g. to continue a long document later::

    save_memory(model_a, "doc.mem", stream=1)     # after the first half of a document
    model_b.allocate_state(2)
    load_memory(model_b, "doc.mem", stream=0)     # stream 0 of model_b continues it

Loading a whole memory maps ``memory.safetensors`` (safetensors' mmap backend, a
private copy-on-write mapping) and hands a FULL kNN ring to the store as its buffer
without reading it: a 1M-token memory loads in milliseconds and its pages come in
as searches touch them; later writes never reach the file. It also adopts the
saved kNN capacity (``memformers memorize`` sizes it to the text, so its memories
are full); one stream is loaded into a model of the same capacity only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from itertools import chain
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from memformers.errors import MemformersError
from memformers.memory.state import (
    collect_state_tensors,
    iter_stream_states,
    load_collected_state_tensors,
    stream_count,
)

FORMAT, VERSION = "memformers-memory", 2
MANIFEST, TENSORS = "memory.json", "memory.safetensors"


def fingerprint(model: torch.nn.Module) -> str:
    """A cheap digest of the weights (names, shapes, first/last 1024 values of each).

    A memory holds keys made by these weights; another model (or the same one
    after fine-tuning) would read them as noise.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if ".memory." in name or not p.is_floating_point():
            continue
        flat = p.detach().flatten()
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(torch.cat([flat[:1024], flat[-1024:]]).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _modules(model: torch.nn.Module) -> dict[str, str]:
    """{module name: class name} of every module with stream state."""
    return {name: type(s).__name__ for name, s in iter_stream_states(model)}


def _settings(model: torch.nn.Module) -> dict[str, dict]:
    """{module name: its storage settings} of the states that have some."""
    settings = {n: s.storage_settings() for n, s in iter_stream_states(model)}
    return {n: v for n, v in settings.items() if v}


def save_memory(model: torch.nn.Module, path: str | Path, *, stream: int | None = None,
                extra: dict | None = None) -> Path:
    """Write the state of every stream (or of ``stream`` only) into directory ``path``
    (replaced atomically); ``extra`` goes into the manifest."""
    modules = _modules(model)
    if not modules:
        raise MemformersError("this model has no stream state (XL cache or memory) to save")
    n = stream_count(model)
    if stream is not None and not 0 <= stream < n:
        raise MemformersError(f"stream {stream} does not exist: the model holds state for "
                              f"{n} streams")
    tensors = collect_state_tensors(model, None if stream is None else [stream])
    settings = _settings(model)
    first = next(iter(settings.values()), {})  # also top level, as version-2 readers expect
    written = next((w for _, s in iter_stream_states(model)
                    if (w := s.tokens_written()) is not None), None)
    manifest = {
        "format": FORMAT, "version": VERSION, "streams": 1 if stream is not None else n,
        "saved_stream": stream, "modules": modules,
        "capacity": first.get("capacity"), "storage_dtype": first.get("storage_dtype"),
        "settings": settings,
        "tokens_written": written if written is None or stream is None else [written[stream]],
        "fingerprint": fingerprint(model), **(extra or {}),
    }
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = None
        if out.exists():
            if not (out / MANIFEST).is_file():
                raise MemformersError(f"{out} exists and is not a saved memory")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)  # a mapped old file stays valid: its inode lives on
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(path: str | Path) -> dict:
    p = Path(path).expanduser()
    if not (p / MANIFEST).is_file() or not (p / TENSORS).is_file():
        raise MemformersError(f"not a saved memory: {p} (expected {MANIFEST} and {TENSORS}; "
                              "make one with `memformers memorize` or save_memory)")
    try:
        manifest = json.loads((p / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MemformersError(f"{p / MANIFEST} is damaged (not JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("version") != VERSION:
        raise MemformersError(f"{p / MANIFEST} is not a version-{VERSION} memformers memory")
    missing = [k for k in ("modules", "fingerprint", "capacity", "storage_dtype", "streams")
               if k not in manifest]
    if missing:
        raise MemformersError(f"{p / MANIFEST} is damaged: it lacks {', '.join(missing)}")
    return manifest


def _describe(modules: dict[str, str]) -> str:
    return ", ".join(f"{cls} {name}" for name, cls in modules.items())


def load_memory(model: torch.nn.Module, path: str | Path, *, stream: int | None = None,
                strict: bool = True) -> dict:
    """Load a saved memory into ``model``; returns the manifest.

    ``stream=None``: the whole saved state replaces the model's (memory-mapped, with the
    saved kNN capacity). ``stream=j``: a memory of one stream becomes stream j of the
    model (allocated beforehand); its other streams keep their state.
    ``strict``: refuse a memory made by other weights (see ``fingerprint``).
    """
    manifest = read_manifest(path)
    if manifest["modules"] != _modules(model):
        raise MemformersError(f"memory {path} holds the state of {_describe(manifest['modules'])}"
                              f"; this model has {_describe(_modules(model)) or 'none'}")
    if strict and manifest["fingerprint"] != fingerprint(model):
        raise MemformersError(f"memory {path} was made by other weights (fingerprint "
                              f"{manifest['fingerprint']}, model {fingerprint(model)}); "
                              "pass strict=False to load it anyway")
    states = dict(iter_stream_states(model))
    saved_settings = manifest.get("settings") or {  # memories saved before "settings"
        name: {"capacity": manifest["capacity"], "storage_dtype": manifest["storage_dtype"]}
        for name in _settings(model)}
    if stream is not None:
        if manifest["streams"] != 1:
            raise MemformersError(f"memory {path} holds {manifest['streams']} streams; save "
                                  "one (save_memory(..., stream=i)) to load it into a stream")
        for name, settings in saved_settings.items():
            state = states[name]
            if settings != state.storage_settings():
                raise MemformersError(
                    f"memory {path} has {state.describe_settings(settings)}; this model "
                    f"{state.describe_settings(state.storage_settings())}")
    try:
        with safe_open(str(Path(path).expanduser() / TENSORS), framework="pt") as f:
            saved = {k: f.get_tensor(k) for k in f.keys()}  # mapped, not read
    except Exception as e:  # safetensors raises several types for damaged files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MemformersError(f"memory {path}: {TENSORS} is damaged or not safetensors "
                              f"({first})") from None
    if stream is not None:
        load_collected_state_tensors(model, saved, into=[stream])
        return manifest
    for name, settings in saved_settings.items():
        states[name].adopt_storage_settings(settings)
    if hasattr(model, "allocate_state"):  # MemformerLM, HFMemoryLM
        model.allocate_state(manifest["streams"])
    else:  # a Hugging Face retrofit, perhaps spread over devices: each layer on its own
        for _, s in iter_stream_states(model):  # (a kNN-LM has no parameters: a buffer)
            s.allocate(manifest["streams"], next(chain(s.parameters(), s.buffers())).device)
    load_collected_state_tensors(model, saved, adopt=True)
    return manifest
