import hashlib

import pytest
import torch

from memformers.config import load_config
from memformers.errors import MemformersError
from memformers.model import MemformerLM
from memformers.pretrained import resolve_weights, shipped_record, shipped_weights
from memformers.train.checkpoint import load_model_weights


def test_demo_base_matches_recorded_hash():
    path = shipped_weights("demo-base")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == shipped_record("demo-base")["sha256"]


def test_demo_base_loads_into_its_config_and_predicts_python():
    cfg = load_config("configs/demo/base.toml")
    model = MemformerLM(cfg.model).eval()
    missing = load_model_weights(model, shipped_weights("demo-base"), strict=False)
    assert missing == ["blocks.2.attn.memory.gate"]  # never trained: starts at gate_init
    text = b"import os\nimport sys\n\n\ndef main():\n    return 0\n" * 4
    tokens = torch.tensor([list(text)])
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits[0], tokens[0, 1:])
    assert loss.item() < 1.0  # an untrained model is at ln(256) = 5.5


def test_bad_init_from_is_a_clear_error(tmp_path):
    with pytest.raises(MemformersError, match="no weights at"):
        resolve_weights(str(tmp_path / "nothing"))
    with pytest.raises(MemformersError, match="no shipped weights"):
        shipped_weights("gpt-17")
