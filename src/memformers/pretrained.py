"""Weights memformers pretrained itself and ships in the package.

``demo-base``: the demo's base model (configs/demo/base.toml), a 3.2M-parameter
Transformer-XL pretrained on one GPU on the grouped standard-library corpus;
its record (``assets/demo-base.json``) holds the command, the sha256 and the
held-out figures. ``train.init_from = "demo-base"`` starts a run from it.

``passkey-knn``: demo-base with a 65K kNN memory, fine-tuned on GPU for 1,500
steps on passkey prompts of <= 4K tokens (configs/passkey-finetune.toml,
then run as scripts/passkey_finetune.py); it
retrieves the key from 64K-256K tokens. Its record holds the model config,
so ``load_shipped_model("passkey-knn")`` needs no config file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from memformers.errors import MemformersError

ASSETS = Path(__file__).parent / "assets"
SHIPPED = ("demo-base", "passkey-knn")


def shipped_record(name: str) -> dict:
    return json.loads((ASSETS / f"{name}.json").read_text())


def shipped_weights(name: str, verify: bool = True) -> Path:
    """Path of shipped weights ``name``, checked against the recorded sha256."""
    if name not in SHIPPED:
        raise MemformersError(f"no shipped weights named '{name}' (have: {', '.join(SHIPPED)})")
    record = shipped_record(name)
    path = ASSETS / record["file"]
    if not path.is_file():
        raise MemformersError(f"shipped weights missing: {path}")
    if verify:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != record["sha256"]:
            raise MemformersError(f"{path} does not match its recorded sha256 "
                                  f"({digest[:12]} != {record['sha256'][:12]}); reinstall")
    return path


def untrained_tensors(value: str) -> set[str]:
    """Tensors of shipped weights ``value`` that training never touched (e.g. the gate of a
    kNN layer of capacity 0): ``train.init_from`` leaves them at the new config's init."""
    return set(shipped_record(value).get("untrained", [])) if value in SHIPPED else set()


def resolve_weights(value: str) -> Path:
    """``train.init_from``: a shipped name, a run directory or a .safetensors file."""
    if value in SHIPPED:
        return shipped_weights(value)
    path = Path(value)
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise MemformersError(f"train.init_from: no weights at {weights} (a run directory, a "
                              f".safetensors file or one of: {', '.join(SHIPPED)})")
    return weights


def shipped_config(name: str, overrides: list[str] = ()):
    """The ``RunConfig`` of shipped weights ``name`` (model, segment length and corpus of its
    record) with ``overrides`` (``key=value``, e.g. ``model.knnlm.capacity=65536``)."""
    from memformers.config import apply_overrides, config_from_dict

    if name not in SHIPPED:
        raise MemformersError(f"no shipped weights named '{name}' (have: {', '.join(SHIPPED)})")
    record = shipped_record(name)
    data = {"segment_len": record["segment_len"]}
    if "corpus" in record:
        data["corpus"] = record["corpus"]
    raw = {"model": record["model"], "data": data}
    return config_from_dict(apply_overrides(raw, list(overrides)))


def load_shipped_model(name: str, overrides: list[str] = (), device="cpu"):
    """(RunConfig, MemformerLM in eval mode) of shipped weights ``name``; see ``shipped_config``.
    """
    from memformers.model import MemformerLM
    from memformers.train.checkpoint import load_model_weights

    cfg = shipped_config(name, overrides)
    model = MemformerLM(cfg.model).to(device)
    load_model_weights(model, shipped_weights(name))
    return cfg, model.eval()
