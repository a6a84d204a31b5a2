"""Save and load a retrofitted model (its memory: ``memformers.memory.persist``).

``model.save_pretrained(dir)`` already writes the base weights, the memory
parameters (``...memory.gate`` etc.; a kNN-LM has none) and the memory settings
(``config.memformers``); ``load_pretrained(dir)`` loads the base with
``from_pretrained``, re-applies ``add_memory`` from that config and loads the
memory parameters. What the memory holds is saved and loaded (memory-mapped) by
``save_memory`` / ``load_memory``, the API of every memformers model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from memformers.errors import MemformersError
from memformers.hf.retrofit import add_memory, require_transformers


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def load_pretrained(path: str | Path, *, allow_pickle: bool = False,
                    **from_pretrained_kwargs) -> torch.nn.Module:
    """A retrofitted model saved with ``save_pretrained``: base weights, memory layers, gates.

    Weights load from safetensors only; a directory holding only pickle weights
    (``pytorch_model.bin``) is refused unless ``allow_pickle=True`` (never for untrusted
    files: unpickling runs code)."""
    transformers = require_transformers()
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise MemformersError(f"not a Hugging Face model directory: {p} (no config.json)")
    config = transformers.AutoConfig.from_pretrained(str(p))
    settings = getattr(config, "memformers", None)
    if not settings:
        raise MemformersError(f"{p} has no memory (no 'memformers' section in config.json); "
                              "load it with from_pretrained and call add_memory")
    if not allow_pickle:
        if not weight_files(p):
            raise MemformersError(f"{p} has no safetensors weights (model.safetensors); "
                                  "memformers does not unpickle weight files")
        from_pretrained_kwargs["use_safetensors"] = True
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
