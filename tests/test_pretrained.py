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
    assert load_model_weights(model, shipped_weights("demo-base")) == []  # strict: all there
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


def test_passkey_knn_retrieves_beyond_the_window_only_with_its_memory():
    """The shipped passkey model: needle ~900 tokens back, window = 2 x 256 tokens."""
    from memformers.data.tokenizer import ByteTokenizer
    from memformers.evaluate.passkey import evaluate_passkey
    from memformers.pretrained import load_shipped_model

    record = shipped_record("passkey-knn")
    assert hashlib.sha256(shipped_weights("passkey-knn").read_bytes()).hexdigest() == \
        record["sha256"]
    acc = {}
    for capacity in (4096, 0):
        cfg, model = load_shipped_model("passkey-knn", [f"model.knn.capacity={capacity}"])
        r = evaluate_passkey(model, ByteTokenizer(), [1024], [0.0], samples_per_cell=2,
                             segment_len=cfg.data.segment_len, progress=False, seed=7)
        acc[capacity] = r["accuracy"][0][0]
    assert acc == {4096: 1.0, 0: 0.0}


def test_shipped_names_load_like_run_directories():
    from memformers.cli import load_trained_model
    from memformers.pretrained import load_shipped_model

    cfg, model = load_shipped_model("demo-base", ["model.knnlm.capacity=128"])
    assert cfg.model.n_layers == 4 and model.knnlm is not None and cfg.data.segment_len == 256
    cfg2, model2, tok = load_trained_model("demo-base", ["data.corpus=none"], "cpu",
                                           need_corpus=False)
    assert cfg2.model == load_config("configs/demo/base.toml").model
    assert tok.vocab_size == 256
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


def test_init_from_leaves_untrained_shipped_tensors_at_the_new_init(tiny_corpus, tmp_path):
    """demo-base's kNN gate never trained (capacity 0): a fine-tune with gate_init=-2
    starts the gate at -2, not at the stored 0; every trained tensor is loaded."""
    from safetensors.torch import load_file

    from memformers.train.trainer import Trainer

    cfg = load_config("configs/demo/base.toml", [
        f"data.corpus=\"{tiny_corpus}\"", "train.init_from='demo-base'", "train.steps=1",
        "model.knn.capacity=64", "model.knn.gate_init=-2.0", "data.batch_size=2",
        "data.segment_len=32"])
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    try:
        state = tr.model.state_dict()
        assert bool((state["blocks.2.attn.memory.gate"] == -2.0).all())
        shipped = load_file(str(shipped_weights("demo-base")))
        for name, t in shipped.items():
            if name != "blocks.2.attn.memory.gate":
                assert torch.equal(state[name], t.to(state[name].dtype)), name
    finally:
        tr.close()
