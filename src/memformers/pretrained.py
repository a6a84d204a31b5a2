"""Weights memformers pretrained itself and ships in the package.

``demo-base``: the demo's base model (configs/demo/base.toml), a 3.2M-parameter
Transformer-XL pretrained on one GPU on the grouped standard-library corpus;
its record (``assets/demo-base.json``) holds the command, the sha256 and the
held-out figures. ``train.init_from = "demo-base"`` starts a run from it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from memformers.errors import MemformersError

ASSETS = Path(__file__).parent / "assets"
SHIPPED = ("demo-base",)


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
