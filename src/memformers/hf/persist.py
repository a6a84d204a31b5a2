"""Save and load what a retrofitted model remembers, and the retrofitted model itself.

A memory on disk is a directory::

    memory.json          manifest: kind, layers, batch rows, kNN capacity and dtype, tokens
                         written per row, the fingerprint of the weights that made it
    memory.safetensors   every memory layer's state, "<layer>.<name>": kNN count (B,),
                         keys and values (B, Hkv, C, d); Infini M (B, H, d, d), z (B, H, d)

``load_memory`` maps ``memory.safetensors`` (safetensors' mmap backend, a
private copy-on-write mapping) and hands a FULL kNN ring to the store as its
buffer without reading it: a 1M-token memory loads in milliseconds and its
pages come in as searches touch them; later writes never reach the file. A
ring that is not full (fewer rows than its capacity) is copied into a fresh one.
``memformers memorize`` sizes the capacity to the text, so its memories are full.

The retrofitted model: ``model.save_pretrained(dir)`` already writes the base
weights, the memory parameters (``...memory.gate`` etc.) and the memory
settings (``config.memformers``); ``load_pretrained(dir)`` loads the base with
``from_pretrained``, re-applies ``add_memory`` from that config and loads the
memory parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from memformers.errors import MemformersError
from memformers.hf.retrofit import add_memory, memory_layers, require_transformers

FORMAT, VERSION = "memformers-memory", 1
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


def save_memory(model: torch.nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """Write the memory of every memory layer into directory ``path`` (replaced atomically)."""
    layers = memory_layers(model)
    kind = layers[0][1].kind
    tensors, tokens = {}, None
    for i, layer in layers:
        for key, t in layer.memory.state_tensors().items():
            tensors[f"{i}.{key}"] = t.detach().to("cpu").contiguous()
        if kind == "knn":
            tokens = layer.memory.store.count.tolist()
    manifest = {
        "format": FORMAT, "version": VERSION, "kind": kind, "layers": [i for i, _ in layers],
        "rows": layers[0][1].rows(),
        "capacity": layers[0][1].memory.cfg.capacity if kind == "knn" else None,
        "storage_dtype": layers[0][1].memory.cfg.storage_dtype if kind == "knn" else None,
        "tokens_written": tokens, "fingerprint": fingerprint(model),
        "model_type": model.config.model_type, **(extra or {}),
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
    manifest = json.loads((p / MANIFEST).read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise MemformersError(f"{p / MANIFEST} is not a version-{VERSION} memformers memory")
    return manifest


def load_memory(model: torch.nn.Module, path: str | Path, strict: bool = True) -> dict:
    """Load a saved memory into ``model``'s memory layers (memory-mapped); returns the manifest.

    ``strict``: refuse a memory made by other weights (see ``fingerprint``).
    """
    manifest = read_manifest(path)
    layers = memory_layers(model)
    kind, indices = layers[0][1].kind, [i for i, _ in layers]
    if manifest["kind"] != kind or manifest["layers"] != indices:
        raise MemformersError(f"memory {path} is a {manifest['kind']} memory of layers "
                              f"{manifest['layers']}; this model has a {kind} memory in "
                              f"layers {indices}")
    if strict and manifest["fingerprint"] != fingerprint(model):
        raise MemformersError(f"memory {path} was made by other weights (fingerprint "
                              f"{manifest['fingerprint']}, model {fingerprint(model)}); "
                              "pass strict=False to load it anyway")
    with safe_open(str(Path(path).expanduser() / TENSORS), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}  # mapped, not read
    rows = manifest["rows"]
    for i, layer in layers:
        tensors = {k.split(".", 1)[1]: t for k, t in saved.items() if k.split(".", 1)[0] == str(i)}
        device = next(layer.memory.parameters()).device
        if kind == "knn":
            layer.memory.set_storage(manifest["capacity"], manifest["storage_dtype"])
            layer.memory.store.allocate(rows, device)
            if tensors:
                layer.memory.load_state_tensors(tensors, copy=False)
        else:
            layer.memory.allocate(rows, device)
            if tensors:
                layer.memory.load_state_tensors(tensors)
    return manifest


# --------------------------------------------------------------------------- the model


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def load_pretrained(path: str | Path, **from_pretrained_kwargs) -> torch.nn.Module:
    """A retrofitted model saved with ``save_pretrained``: base weights, memory layers, gates."""
    transformers = require_transformers()
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise MemformersError(f"not a Hugging Face model directory: {p} (no config.json)")
    config = transformers.AutoConfig.from_pretrained(str(p))
    settings = getattr(config, "memformers", None)
    if not settings:
        raise MemformersError(f"{p} has no memory (no 'memformers' section in config.json); "
                              "load it with from_pretrained and call add_memory")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the memory tensors are "unexpected" to it
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(p),
                                                                  **from_pretrained_kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    options = {k: v for k, v in settings.items() if k != "kind"}
    add_memory(model, kind=settings["kind"], **options)
    wanted = {n: t for n, t in model.state_dict().items() if ".memory." in n}
    found = {}
    for file in weight_files(p):
        with safe_open(str(file), framework="pt") as f:
            found.update({k: f.get_tensor(k) for k in f.keys() if k in wanted})
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise MemformersError(f"{p} lacks the memory parameters {missing[:3]}; was it saved "
                              "after add_memory?")
    with torch.no_grad():
        for name, t in found.items():
            wanted[name].copy_(t)
    return model
