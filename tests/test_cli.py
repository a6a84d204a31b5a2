import subprocess
import sys

import pytest

from memformers.cli import main
from tests.conftest import TINY_MODEL


def run_cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def test_unknown_config_key_suggests_closest(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--set", "model.n_layer=2", "--config",
                        "configs/baseline.toml", "--run-dir", str(tmp_path))
    assert code == 2 and err == ("error: unknown config key 'model.n_layer' "
                                 "(did you mean 'model.n_layers'?)")


@pytest.mark.parametrize("args, needle", [
    (["train", "--config", "nope.toml"], "config file not found"),
    (["train", "--config", "configs/baseline.toml", "--set", "model.n_heads=0"], "positive"),
    (["train", "--config", "configs/baseline.toml", "--set", "model.knn.layers=[9]"],
     "does not exist"),
    (["train", "--config", "configs/baseline.toml", "--set", "data.corpus='/nonexistent'"],
     "not a memformers corpus"),
    (["eval", "/nonexistent/run"], "not a memformers run directory"),
    (["train", "--set", "model.knn.backend='faiss'", "--set", "model.knn.capacity=20000"],
     "multiple of model.knn.faiss_block"),
    (["train", "--resume", "--run-dir", "/nonexistent/run"], "not a memformers run directory"),
    (["train", "--set", "model.hf_path='gpt2'", "--set", "train.checkpoint_activations=true"],
     "train.checkpoint_activations does not support a Hugging Face model"),
])
def test_error_paths_are_one_line(capsys, args, needle):
    code, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and needle in err and "\n" not in err


def test_too_little_memory_is_refused_before_allocating(capsys, tiny_corpus, tmp_path):
    sets = [x for s in TINY_MODEL for x in ("--set", s)]
    code, err = run_cli(capsys, "train", "--config", "configs/baseline.toml", *sets,
                        "--set", f"data.corpus='{tiny_corpus}'", "--set", "model.knn.layers=[1]",
                        "--set", "model.knn.capacity=100000000000", "--run-dir", str(tmp_path))
    assert code == 2 and "too little memory" in err


def test_corrupt_checkpoint_is_reported(capsys, tiny_corpus, tmp_path):
    sets = [x for s in TINY_MODEL for x in ("--set", s)]
    run = tmp_path / "run"
    assert main(["train", "--config", "configs/baseline.toml", *sets, "--set",
                 f"data.corpus='{tiny_corpus}'", "--set", "train.steps=2", "--run-dir",
                 str(run), "--no-progress"]) == 0
    (run / "model.safetensors").write_bytes(b"not a safetensors file")
    capsys.readouterr()
    code, err = run_cli(capsys, "eval", str(run))
    assert code == 2 and "cannot read weights" in err


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "memformers", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "train" in out.stdout
