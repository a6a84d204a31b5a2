import json
import subprocess
import sys
from pathlib import Path

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
    (["sorting", "--config", "configs/baseline.toml", "--lengths", "64,abc"], "--lengths"),
    (["sorting", "--config", "configs/baseline.toml", "--lengths", "0"], "--lengths"),
    (["sorting", "--config", "configs/baseline.toml", "--lengths", "64", "--steps", "0"],
     "--steps"),
    (["sorting", "--config", "nope.toml", "--lengths", "64"], "config file not found"),
    (["sorting", "--config", "configs/baseline.toml", "--lengths", "64", "--eval-every", "-1"],
     "--eval-every"),
    (["train", "--set", "model.hf_path='gpt2'", "--set", "model.knn.layers=auto"],
     "needs a memformers model"),
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


def train_tiny(corpus: Path, run: Path, *sets: str) -> Path:
    """A tiny model trained for 2 steps in ``run``."""
    args = [x for s in [*TINY_MODEL, f"data.corpus='{corpus}'", "train.steps=2",
                        "data.eval_max_tokens=256", *sets] for x in ("--set", s)]
    assert main(["train", "--config", "configs/baseline.toml", *args, "--run-dir", str(run),
                 "--no-progress"]) == 0
    return run


def test_corrupt_checkpoint_is_reported(capsys, tiny_corpus, tmp_path):
    run = train_tiny(tiny_corpus, tmp_path / "run")
    (run / "model.safetensors").write_bytes(b"not a safetensors file")
    capsys.readouterr()
    code, err = run_cli(capsys, "eval", str(run))
    assert code == 2 and "does not match its recorded sha256" in err  # checked first
    (run / "model.safetensors.sha256").unlink()  # weights saved without a digest
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


def test_sorting_learning_curve_is_written_as_it_goes(monkeypatch, tmp_path):
    """--eval-every N scores the same fresh examples every N steps; results.json holds the
    curve of the length in progress after every point, so a run stopped early keeps it."""
    import memformers.cli as cli_mod
    from memformers.train import checkpoint

    snapshots = []
    write = checkpoint.atomic_write_text

    def spy(path, text):
        write(path, text)
        snapshots.append(json.loads(text))

    monkeypatch.setattr(checkpoint, "atomic_write_text", spy)
    sets = [x for s in [*TINY_MODEL, "model.xl_cache=true"] for x in ("--set", s)]
    out = tmp_path / "curve"
    assert cli_mod.main(["sorting", "--config", "configs/baseline.toml", *sets, "--lengths",
                         "40", "--steps", "4", "--samples", "3", "--eval-every", "2",
                         "--out", str(out), "--no-progress"]) == 0
    # one write at step 2 (in progress), one when the length is done
    assert [s.get("in_progress", {}).get("length") for s in snapshots] == [40, None]
    assert [p["step"] for p in snapshots[0]["in_progress"]["curve"]] == [2]
    final = json.loads((out / "results.json").read_text())["sorting"]["40"]
    assert [p["step"] for p in final["curve"]] == [2, 4]
    assert final["curve"][-1]["accuracy"] == final["accuracy"]  # the last point is the result
    assert final["curve"][0] == snapshots[0]["in_progress"]["curve"][0]
    assert (out / "sorting_curves.png").stat().st_size > 1000


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "memformers", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "train" in out.stdout


@pytest.fixture(scope="module")
def knn_run(tiny_corpus, tmp_path_factory) -> Path:
    """A tiny XL + kNN model (capacity 64 in layer 1)."""
    return train_tiny(tiny_corpus, tmp_path_factory.mktemp("knn") / "run", "model.xl_cache=true",
                      "model.knn.layers=[1]", "model.knn.capacity=64")


def test_eval_sweeps_memory_and_xl_cache_and_writes_a_report(capsys, knn_run, tmp_path):
    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["eval", str(knn_run), "--max-docs", "2", "--max-tokens", "600",
                 "--memory-sweep", "0,64,256", "--memory-sweep-xl", "on,off",
                 "--loss-diff-capacities", "0,64", "--winners", "3",
                 "--passkey-lengths", "320", "--passkey-depths", "0.5",
                 "--passkey-samples", "1", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for section in ["## Memory-size sweep", "## Per-token loss difference", "## Passkey",
                    "## Memory gates per head", "| run | blocks.1 |"]:
        assert section in printed
    results = json.loads((out / "results.json").read_text())
    run = results["variants"][0]
    sweep = {(p["capacity"], p["xl_cache"]): p["loss"] for p in run["memory_sweep"]}
    assert list(sweep) == [(0, True), (64, True), (256, True), (0, False), (64, False),
                           (256, False)]
    assert sweep[64, True] == pytest.approx(run["eval"]["loss"], rel=1e-6)  # as trained
    assert sweep[64, False] != sweep[64, True]
    assert (results["loss_diff"]["a"], results["loss_diff"]["b"]) == ("run@0", "run@64")
    assert 0 < len(results["loss_diff"]["winners"]) <= 3
    assert run["passkey"]["lengths"] == [320] and list(run["static"]["gates"]) == ["blocks.1"]
    report = (out / "report.md").read_text()
    assert report.startswith(f"# Evaluation: {knn_run}") and "| run | off | 256 |" in report
    for png in ["memory_sweep.png", "loss_diff.png", "gates.png", "passkey-run.png"]:
        assert (out / png).stat().st_size > 1000, png
    assert not (knn_run / "eval-valid.json").exists()  # --out: everything goes there


def test_plain_eval_writes_the_lm_result_next_to_the_run(capsys, knn_run):
    assert main(["eval", str(knn_run), "--max-tokens", "300", "--no-progress"]) == 0
    saved = json.loads((knn_run / "eval-valid.json").read_text())
    assert saved["tokens"] >= 300 and "doc_losses" not in saved
    assert "Memory gates per head" in capsys.readouterr().out  # gates are always shown


def test_knnlm_tune_writes_its_record_into_new_directories(capsys, knn_run, tmp_path):
    out = tmp_path / "new" / "dir" / "tune.json"
    assert main(["knnlm-tune", str(knn_run), "--max-tokens", "200", "--no-progress",
                 "--set", "model.knnlm.capacity=64", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["tokens"] >= 200 and saved["best"] == min(saved["grid"],
                                                           key=lambda r: r["loss"])
    assert not list(out.parent.glob("*.tmp"))  # written atomically


@pytest.mark.parametrize("args, message", [
    (["--memory-sweep", "0,1.5K"], "--memory-sweep: expected a comma-separated list of int"),
    (["--memory-sweep", "0,64", "--memory-sweep-xl", "on,maybe"],
     "--memory-sweep-xl must be \"on\", \"off\" or both"),
    (["--memory-sweep-xl", "off"], "--memory-sweep-xl needs --memory-sweep"),
    (["--memory-sweep", "0,64", "--loss-diff-capacities", "0,128"],
     "--loss-diff-capacities must be two capacities of --memory-sweep"),
    (["--passkey-depths", "0.5,2"], "--passkey-depths must be numbers in [0, 1]"),
    (["--passkey-lengths", "64"], "--passkey-lengths: passkey length 64 is too short"),
])
def test_eval_option_errors_are_one_line(capsys, knn_run, args, message):
    code, err = run_cli(capsys, "eval", str(knn_run), "--no-progress", *args)
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err


def test_memory_sweep_of_a_model_without_knn_layers_is_refused(capsys, tiny_corpus, tmp_path):
    run = train_tiny(tiny_corpus, tmp_path / "run")
    code, err = run_cli(capsys, "eval", str(run), "--memory-sweep", "0,64")
    assert code == 2 and err == ("error: --memory-sweep needs a model with kNN memory layers "
                                 "(model.knn.layers is empty)")
