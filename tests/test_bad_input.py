"""Bad input: one line on stderr, exit status 2, and nothing in the run directory changed."""

import json
import os
from pathlib import Path

import pytest

from memformers.cli import main
from memformers.errors import MemformersError
from memformers.train.checkpoint import lock_run_dir, record_config_changes, truncate_metrics
from tests.conftest import TINY_MODEL


def tiny_train(corpus: Path, run: Path, *extra: str) -> list[str]:
    args = ["train", "--run-dir", str(run), "--no-progress"]
    for s in [*TINY_MODEL, f"data.corpus=\"{corpus}\"", "train.steps=2", "train.ckpt_every=1",
              *extra]:
        args += ["--set", s]
    return args


def snapshot(run: Path) -> dict:
    if not run.exists():
        return {}
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("setting, needle", [
    ("train.grad_clip=-1", "train.grad_clip must be >= 0"),
    ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
    ("train.betas=[0.9]", "train.betas must be two numbers"),
    ("train.betas=[1.5,0.9]", "train.betas must be two numbers"),
    ("model.rel_buckets=0", "model.rel_buckets and model.rel_max_distance must be positive"),
    ("model.rel_max_distance=0", "must be positive"),
    ("model.knn.search_tile=0", "model.knn search sizes must be positive"),
    ("model.knnlm.capacity=-1", "model.knnlm.capacity must be >= 0"),
    ("model.knnlm.lam=1.0", "model.knnlm.lam must be in [0, 1)"),
    ("model.knnlm.temperature=0", "model.knnlm.temperature must be positive"),
    ("model.knnlm.key='middle'", "model.knnlm.key' must be one of"),
    ("model.knnlm.backend='hnsw'", "model.knnlm.backend' must be one of"),
    ("model.knnlm.ivf_nprobe=0", "ivf_nprobe"),
    ("data.eval_max_doc_tokens=-1", "must be >= 0"),
])
def test_bad_settings_are_one_line_and_write_nothing(capsys, tiny_corpus, tmp_path, setting,
                                                     needle):
    run = tmp_path / "run"
    code = main(tiny_train(tiny_corpus, run, setting))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not run.exists()


def test_grad_clip_zero_means_no_clipping(tiny_corpus, tmp_path):
    from memformers.config import load_config
    from memformers.train.trainer import Trainer

    losses = {}
    for clip in (0.0, 1e9):
        cfg = load_config(None, [*TINY_MODEL, f"data.corpus=\"{tiny_corpus}\"",
                                 "train.steps=6", f"train.grad_clip={clip}",
                                 "train.ckpt_every=0"])
        tr = Trainer(cfg, tmp_path / f"r{clip}", progress=False)
        try:
            losses[clip] = tr.run()["loss"]
        finally:
            tr.close()
    assert losses[0.0] == pytest.approx(losses[1e9], rel=1e-6)  # 0 = off, not "zero grads"


def test_a_second_process_on_a_run_directory_is_refused(tmp_path):
    held = lock_run_dir(tmp_path / "run")
    try:
        with pytest.raises(MemformersError, match=rf"in use by .*\(pid {os.getpid()}\)"):
            lock_run_dir(tmp_path / "run")
    finally:
        held.close()
    lock_run_dir(tmp_path / "run").close()  # free again once released


def test_train_refuses_a_locked_run_directory(capsys, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    held = lock_run_dir(run)
    try:
        code = main(tiny_train(tiny_corpus, run))
    finally:
        held.close()
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is in use by another memformers process" in err
    assert snapshot(run) == {}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_run_directory_is_refused_before_work(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o500)
    try:
        with pytest.raises(MemformersError, match="cannot write to run directory"):
            lock_run_dir(run)
    finally:
        run.chmod(0o700)


def test_resume_records_changed_settings(capsys, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    assert main(tiny_train(tiny_corpus, run)) == 0
    assert main(["train", "--run-dir", str(run), "--resume", "--no-progress", "--set",
                 "train.steps=3", "--set", "train.lr=0.002"]) == 0
    changes = [json.loads(x) for x in (run / "changes.jsonl").read_text().splitlines()]
    assert {(c["key"], c["old"], c["new"], c["step"]) for c in changes} == {
        ("train.lr", 0.003, 0.002, 2), ("train.steps", 2, 3, 2)}
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["lr"] == 0.002 and saved["train"]["steps"] == 3
    assert "train.lr changed from 0.003 to 0.002 at step 2" in capsys.readouterr().out


def test_record_config_changes_writes_nothing_when_unchanged(tmp_path):
    cfg = {"train": {"lr": 1.0}, "model": {"knn": {"layers": [1]}}}
    assert record_config_changes(tmp_path, cfg, json.loads(json.dumps(cfg)), 5) == []
    assert not (tmp_path / "changes.jsonl").exists()


def test_resume_truncates_metrics_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 5, "lo')
    truncate_metrics(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_corpus_without_an_eval_split_is_refused_before_training(capsys, tmp_path):
    from memformers.data.corpus import build_corpus

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.txt").write_text("some text to train on. " * 40)
    build_corpus(tmp_path / "c", str(src), tokenizer="byte", split=(1.0, 0.0, 0.0),
                 progress=False)
    run = tmp_path / "run"
    code = main(tiny_train(tmp_path / "c", run))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "valid split" in err and "has no documents" in err
    assert not (run / "checkpoints").exists()


@pytest.fixture
def trained_run(tiny_corpus, tmp_path) -> Path:
    run = tmp_path / "trained"
    assert main(tiny_train(tiny_corpus, run)) == 0
    return run


@pytest.mark.parametrize("args, needle", [
    (["generate", "{run}", "--prompt", "x", "--tokens", "-1"], "--tokens must be >= 1"),
    (["generate", "{run}", "--prompt", "x", "--top-k", "-3"], "--top-k must be >= 0"),
    (["eval", "{run}", "--set", "data.corpus='{bpe}'"], "uses another tokenizer"),
])
def test_bad_run_commands_leave_the_run_unchanged(capsys, trained_run, tmp_path, args, needle):
    from memformers.data.corpus import build_corpus

    bpe = tmp_path / "bpe"
    if any("{bpe}" in a for a in args):
        src = tmp_path / "bsrc"
        src.mkdir()
        for i in range(12):
            (src / f"{i}.txt").write_text(f"document {i}: " + "words and more words " * 50)
        build_corpus(bpe, str(src), tokenizer="bpe", bpe_vocab=300, split=(0.4, 0.3, 0.3),
                     progress=False)
    before = snapshot(trained_run)
    capsys.readouterr()
    code = main([a.format(run=trained_run, bpe=bpe) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert snapshot(trained_run) == before


@pytest.mark.parametrize("damage", ["not json {", "[1, 2]"])
def test_malformed_run_config_is_one_line(capsys, trained_run, damage):
    (trained_run / "config.json").write_text(damage)
    before = snapshot(trained_run)
    capsys.readouterr()
    code = main(["eval", str(trained_run), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "config.json" in err, err
    assert snapshot(trained_run) == before


@pytest.mark.parametrize("damage", ["missing offsets", "object offsets", "truncated tokens",
                                    "missing names"])
def test_damaged_corpus_is_one_line(capsys, tiny_corpus, tmp_path, damage):
    import shutil

    import numpy as np

    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    if damage == "missing offsets":
        (corpus / "train.offsets.npy").unlink()
    elif damage == "object offsets":
        np.save(corpus / "train.offsets.npy", np.array([0, "x"], dtype=object),
                allow_pickle=True)
    elif damage == "truncated tokens":
        data = (corpus / "train.tokens.bin").read_bytes()
        (corpus / "train.tokens.bin").write_bytes(data[: len(data) // 2])
    else:
        (corpus / "train.names.json").unlink()
    run = tmp_path / "run"
    code = main(tiny_train(corpus, run))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "damaged" in err, err
    assert not (run / "checkpoints").exists()


def test_symlinks_out_of_the_source_are_skipped_and_counted(tmp_path):
    from memformers.data.corpus import CorpusSplit, build_corpus

    secret = tmp_path / "secret.txt"
    secret.write_text("THE SECRET " * 20)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.txt").write_text(f"ordinary text {i} " * 30)
    (src / "inside.txt").symlink_to(src / "0.txt")  # a link within the source: kept
    (src / "leak.txt").symlink_to(secret)
    manifest = build_corpus(tmp_path / "c", str(src), split=(1, 0, 0), progress=False)
    assert manifest["skipped"]["outside_links"] == 1
    split = CorpusSplit.open(tmp_path / "c", "train")
    text = bytes(split.tokens[: split.num_tokens].tolist())
    assert b"SECRET" not in text and split.n_docs == 5
    manifest = build_corpus(tmp_path / "c2", str(src), split=(1, 0, 0), progress=False,
                            follow_links=True)
    assert manifest["skipped"]["outside_links"] == 0
