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
    ("model.knnlm.ivf_codes='pq8'", "ivf_codes"),
    ("model.knnlm.ivf_rescore=-1", "ivf_rescore"),
    ("model.knn.ivf_codes='pq4' model.head_dim=12", "divisible by 8"),
    ("model.knnlm.ivf_codes='pq4' model.knnlm.ivf_train=8", "ivf_train must be >= 16"),
    ("model.knn.ivf_nlist=16", "ivf_nprobe <= ivf_nlist"),
    ("model.knn.block_size=0", "block_size, block_probe and block_group must be positive"),
    ("task.name='sorting'", "task.name' must be one of"),
    ("task.eval_depths=[1.5]", "task.eval_depths must be a non-empty list"),
    ("task.lengths=[]", "task.lengths must be a non-empty list"),
    ("model.memories.toy.layers=[1]", "no attention memory is registered as 'toy'"),
    ("data.eval_max_doc_tokens=-1", "must be >= 0"),
    ("data.eval_min_doc_tokens=-5", "must be >= 0"),
    ("data.eval_buckets=[8192,2048]", "must be increasing positive"),
    ("data.eval_buckets=[0,2048]", "must be increasing positive"),
    ("model.n_heads=0", "must be positive"),
    ("model.ffn='relu'", "model.ffn' must be one of"),
    ("model.position='alibi'", "model.position' must be one of"),
    ("data.eval_max_docs=-1", "must be >= 0"),
    ("model.dropout=1.5", "model.dropout must be in [0, 1)"),
    ("train.precision='fp16'", "train.precision' must be one of"),
    ("train.device='tpu'", "train.device must be auto, cpu or cuda"),
    ("train.parallel='zero'", "train.parallel' must be one of"),
    ("train.lr=0", "train.lr must be positive"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio must be in [0, 1]"),
    ("train.steps=0", "must be positive"),
    ("train.grad_accum=0", "must be positive"),
    ("train.betas='x'", "must be a list"),
    ("data.segment_len=0", "must be positive"),
    ("data.batch_size=-1", "must be positive"),
    ("model.knn.backend='annoy'", "model.knn.backend' must be one of"),
    ("model.knn.storage_dtype='int8'", "model.knn.storage_dtype' must be one of"),
    ("model.knn.search_dtype='int8'", "model.knn.search_dtype' must be one of"),
    ("model.knn.search_rerank=-1", "model.knn.search_rerank must be >= 0"),
    ("model.pkm.k_dim=3", "model.pkm.k_dim must be even"),
    ("model.pkm.top_k=9999", "must be <= n_keys"),
    ("model.infini.update='hebb'", "model.infini.update' must be one of"),
    ("model.continuous.tau=1.5", "model.continuous.tau must be in (0, 1)"),
    ("model.n_layer=2", "did you mean 'model.n_layers'"),
    ("data.batch_size=100000000", "too little memory"),  # estimated before allocating
    ("model.knnlm.capacity=1000000000", "too little memory"),
])
def test_bad_settings_are_one_line_and_write_nothing(capsys, tiny_corpus, tmp_path, setting,
                                                     needle):
    run = tmp_path / "run"
    code = main(tiny_train(tiny_corpus, run, *setting.split(" ")))  # one or more settings
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


@pytest.fixture(scope="module")
def trained_run(tiny_corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
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
def test_malformed_run_config_is_one_line(capsys, trained_run, tmp_path, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "config.json").write_text(damage)
    before = snapshot(run)
    capsys.readouterr()
    code = main(["eval", str(run), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "config.json" in err, err
    assert snapshot(run) == before


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


@pytest.fixture(scope="module")
def hf_memory(tmp_path_factory):
    """A tiny retrofitted GPT-2 directory and a memory memorised into it (the ask CLI)."""
    transformers = pytest.importorskip("transformers")
    from memformers.data.tokenizer import byte_tokenizer_json
    from memformers.hf import add_memory
    from memformers.hf.configs import tiny_config

    root = tmp_path_factory.mktemp("hfmem")
    torch_model = transformers.AutoModelForCausalLM.from_config(
        tiny_config("gpt2", d_model=32, n_layers=2, n_heads=4, d_ff=64, max_positions=256))
    add_memory(torch_model, kind="knn", layers=[1], capacity=256, top_k=4,
               storage_dtype="float32")
    torch_model.save_pretrained(root / "model")
    byte_tokenizer_json().save(root / "model")
    (root / "text.txt").write_text("def alpha():\n    return 42\n" * 8)
    assert main(["memorize", "--model", str(root / "model"), "--input",
                 str(root / "text.txt"), "--out", str(root / "mem"), "--no-progress"]) == 0
    return root


@pytest.mark.parametrize("damage", ["truncated json", "field-less json", "truncated tensors",
                                    "pickle tensors", "pickle model"])
def test_ask_with_a_damaged_memory_or_model_is_one_line(capsys, hf_memory, tmp_path, damage):
    import pickle
    import shutil

    mem, model = tmp_path / "mem", tmp_path / "model"
    shutil.copytree(hf_memory / "mem", mem)
    shutil.copytree(hf_memory / "model", model)
    manifest = mem / "memory.json"
    if damage == "truncated json":
        manifest.write_text(manifest.read_text()[:40])
    elif damage == "field-less json":
        manifest.write_text(json.dumps({"format": json.loads(manifest.read_text())["format"],
                                        "version": json.loads(manifest.read_text())["version"]}))
    elif damage == "truncated tensors":
        data = (mem / "memory.safetensors").read_bytes()
        (mem / "memory.safetensors").write_bytes(data[: len(data) // 3])
    elif damage == "pickle tensors":
        (mem / "memory.safetensors").write_bytes(pickle.dumps({"keys": [1, 2, 3]}))
    else:
        (model / "model.safetensors").unlink()
        (model / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = main(["ask", "--model", str(model), "--memory", str(mem), "--prompt", "def"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args, needle", [
    (["data", "build", "--source", "{src}", "--out", "{file}"], "is a file, not a directory"),
    (["data", "build", "--source", "{src}", "--out", "{tmp}/c", "--tokenizer", "bpe",
      "--bpe-vocab", "100000000"], "--bpe-vocab must be in"),
    (["data", "build", "--source", "{src}", "--out", "{tmp}/c", "--split", "0.5,x,1"],
     "--split"),
    (["data", "build", "--source", "{tmp}/nothing-here", "--out", "{tmp}/c"], ""),
    (["data", "stats", "{tmp}/nothing-here"], "not a memformers corpus"),
    (["eval", "{run}", "--set", "model.d_model=64"], "does not match this model"),
    (["eval", "{run}", "--set", "model.n_layers=3"], "does not match this model"),
    (["eval", "{run}", "--max-docs", "-5"], "must be >= -1"),
    (["eval", "{run}", "--set", "model.knn.layers=[7]"], "does not exist"),
    (["eval", "{run}", "--set", "nonsense"], "--set expects key=value"),
    (["eval", "{run}", "--set", "model.knnlm.lam=-1"], "model.knnlm.lam"),
    (["knnlm-tune", "{run}", "--set", "model.knnlm.capacity=-2"], "model.knnlm.capacity"),
    (["knnlm-tune", "{run}", "--out", "{file}/tune.json"], "cannot create"),
    (["generate", "{run}", "--prompt", ""], "--prompt must not be empty"),
    (["train", "--run-dir", "{run}", "--resume", "--set", "model.d_model=64"],
     "does not match this model"),
    (["train", "--run-dir", "{run}", "--no-progress", "--set", "data.corpus='{corpus}'"],
     "already holds a run"),
    (["eval", "demo-base", "--set", "data.corpus='{tmp}/none'"], "not a memformers corpus"),
])
def test_more_bad_commands_are_one_line_and_change_nothing(capsys, trained_run, tiny_corpus,
                                                           tmp_path, args, needle):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.txt").write_text(f"text {i} " * 50)
    (tmp_path / "afile").write_text("x")
    before = snapshot(trained_run)
    capsys.readouterr()
    code = main([a.format(run=trained_run, src=src, tmp=tmp_path, file=tmp_path / "afile",
                          corpus=tiny_corpus) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert snapshot(trained_run) == before


@pytest.mark.parametrize("args", [["eval", "somewhere", "--split", "foo"],
                                  ["train", "--no-such-option"], ["no-such-command"]])
def test_usage_errors_are_one_line(capsys, args):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
