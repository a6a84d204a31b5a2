import json
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
    (["sorting", "--config", "configs/baseline.toml", "--lengths", "64,abc"], "--lengths"),
    (["sorting", "--config", "configs/baseline.toml", "--lengths", "0"], "--lengths"),
    (["sorting", "--config", "configs/baseline.toml", "--lengths", "64", "--steps", "0"],
     "--steps"),
    (["sorting", "--config", "nope.toml", "--lengths", "64"], "config file not found"),
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


def test_sorting_command_trains_scores_and_writes_results(capsys, tmp_path):
    sets = [x for s in [*TINY_MODEL, "model.xl_cache=true"] for x in ("--set", s)]
    out = tmp_path / "sorting"
    assert main(["sorting", "--config", "configs/baseline.toml", *sets, "--lengths", "40,70",
                 "--steps", "2", "--samples", "3", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["length", "accuracy", "loss", "train", "s"]
    record = json.loads((out / "results.json").read_text())
    assert record["steps"] == 2 and record["config"]["model"]["xl_cache"] is True
    assert list(record["sorting"]) == ["40", "70"]
    for row, (t, r) in zip(printed[1:3], record["sorting"].items()):
        assert r["length"] == int(t) and r["steps"] == 2 and r["samples"] == 3
        assert 0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 and r["train_seconds"] > 0
        assert row.split()[:2] == [t, f"{r['accuracy']:.1%}"]
    assert (out / "sorting.png").stat().st_size > 1000


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "memformers", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "train" in out.stdout
