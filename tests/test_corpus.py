"""Corpus building: sources, filtering, splits, on-disk format, errors."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from memformers.data.cli import add_data_subparser, run_data_command
from memformers.data.corpus import (
    CorpusSplit,
    build_corpus,
    default_corpus_dir,
    format_stats,
    open_corpus_manifest,
)
from memformers.data.sources import glob_to_regex
from memformers.data.tokenizer import ByteTokenizer, load_tokenizer
from memformers.errors import MemformersError

SPLITS = ("train", "valid", "test")


def make_text_dir(root, n=40):
    """n good text files in two packages, plus one binary, one empty, one non-UTF-8 file."""
    texts = {}
    for i in range(n):
        rel = f"pkg{i % 2}/sub/file{i:02d}.txt" if i % 3 else f"pkg{i % 2}/file{i:02d}.txt"
        texts[rel] = f"document {i} héllo\n" * (i + 1)
    for rel, text in texts.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "pkg0/image.bin").write_bytes(b"\x89PNG\x00\x00\x01binary")
    (root / "pkg0/empty.txt").write_text("  \n\t\n")
    (root / "pkg1/latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    return texts


def read_all(corpus):
    """{name: text} over all splits, decoded with the byte tokenizer."""
    tok, docs = ByteTokenizer(), {}
    for s in SPLITS:
        cs = CorpusSplit.open(corpus, s)
        for i, name in enumerate(cs.names):
            docs[name] = tok.decode(cs.doc(i))
    return docs


def test_build_from_directory(tmp_path):
    texts = make_text_dir(tmp_path / "src")
    m = build_corpus(tmp_path / "c", tmp_path / "src", split="0.6,0.2,0.2", progress=False)
    assert m["skipped"] == {"binary": 1, "undecodable": 1, "empty": 1, "outside_links": 0}
    assert m["tokenizer"] == {"name": "byte", "vocab_size": 256}
    assert m["dtype"] == "uint16"
    assert sum(m["splits"][s]["documents"] for s in SPLITS) == len(texts)
    assert all(m["splits"][s]["documents"] > 0 for s in SPLITS)
    total_bytes = sum(len(t.encode()) for t in texts.values())
    assert sum(m["splits"][s]["bytes"] for s in SPLITS) == total_bytes
    assert sum(m["splits"][s]["tokens"] for s in SPLITS) == total_bytes
    hist_total = sum(sum(m["splits"][s]["length_histogram"].values()) for s in SPLITS)
    assert hist_total == len(texts)

    assert read_all(tmp_path / "c") == texts  # exact round trip
    train = CorpusSplit.open(tmp_path / "c", "train")
    assert train.names == sorted(train.names)  # source order is sorted paths
    assert train.num_tokens == m["splits"]["train"]["tokens"]
    assert train.doc_len(0) == len(train.doc(0))
    assert train.tokens.dtype == np.uint16 and not train.tokens.flags.writeable
    assert load_tokenizer(tmp_path / "c").name == "byte"
    assert open_corpus_manifest(tmp_path / "c", verify=True)["sha256"] == m["sha256"]

    text = format_stats(m)
    assert "train" in text and "1 binary, 1 undecodable, 1 empty" in text


def test_build_is_deterministic_and_split_by_name(tmp_path):
    make_text_dir(tmp_path / "src")
    m1 = build_corpus(tmp_path / "a", tmp_path / "src", split="0.6,0.2,0.2", progress=False)
    m2 = build_corpus(tmp_path / "b", tmp_path / "src", split="0.6,0.2,0.2", progress=False)
    assert m1["sha256"] == m2["sha256"]
    for s in SPLITS:
        names_a = CorpusSplit.open(tmp_path / "a", s).names
        assert names_a == CorpusSplit.open(tmp_path / "b", s).names
    # a document keeps its split when others are removed
    valid = CorpusSplit.open(tmp_path / "a", "valid").names
    (tmp_path / "src" / CorpusSplit.open(tmp_path / "a", "train").names[0]).unlink()
    build_corpus(tmp_path / "c", tmp_path / "src", split="0.6,0.2,0.2", progress=False)
    assert CorpusSplit.open(tmp_path / "c", "valid").names == valid


def test_include_exclude_globs(tmp_path):
    texts = make_text_dir(tmp_path / "src")
    m = build_corpus(tmp_path / "c", tmp_path / "src", include=["pkg0/**/*.txt"],
                     exclude=["**/sub/*"], split="1,0,0", progress=False)
    expected = {k for k in texts if k.startswith("pkg0/") and "/sub/" not in k}
    assert set(CorpusSplit.open(tmp_path / "c", "train").names) == expected
    assert m["skipped"] == {"binary": 0, "undecodable": 0, "empty": 1, "outside_links": 0}
    assert m["splits"]["valid"]["documents"] == 0
    assert CorpusSplit.open(tmp_path / "c", "valid").n_docs == 0


def test_glob_semantics():
    assert glob_to_regex("**/*").match("a.py") and glob_to_regex("**/*").match("a/b/c.py")
    assert glob_to_regex("*.py").match("a.py") and not glob_to_regex("*.py").match("a/b.py")
    assert glob_to_regex("a/**/x?.txt").match("a/x1.txt")
    assert glob_to_regex("a/**/x?.txt").match("a/b/c/x2.txt")
    assert not glob_to_regex("a/**/x?.txt").match("a/x12.txt")


def test_group_by_package(tmp_path):
    texts = make_text_dir(tmp_path / "src")
    build_corpus(tmp_path / "c", tmp_path / "src", group=True, split="1,0,0", progress=False)
    docs = read_all(tmp_path / "c")
    assert set(docs) == {"pkg0", "pkg1"}
    for pkg, doc in docs.items():
        rels = sorted(r for r in texts if r.startswith(pkg + "/"))
        expected = "".join(f"# ==== {r} ====\n{texts[r]}" for r in rels)
        assert doc.startswith(f"# ==== {pkg}/") and "PNG" not in doc
        assert doc.replace(f"# ==== {pkg}/empty.txt ====\n  \n\t\n", "") == expected


def test_jsonl_source(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"body": f"text number {i}\n" * (i + 1)}) for i in range(30)]
    lines.insert(5, "")  # blank lines are ignored
    lines.append(json.dumps({"body": "   "}))
    path.write_text("\n".join(lines) + "\n")
    m = build_corpus(tmp_path / "c", path, text_field="body", split="0.5,0.25,0.25",
                     progress=False)
    assert m["source"]["kind"] == "jsonl"
    assert m["skipped"]["empty"] == 1
    docs = read_all(tmp_path / "c")
    assert len(docs) == 30 and docs["docs.jsonl:1"] == "text number 0\n"

    path.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(MemformersError, match="line 2 is not valid JSON"):
        build_corpus(tmp_path / "d", path, text_field="body", progress=False)
    with pytest.raises(MemformersError, match="line 1 has no 'text' field"):
        build_corpus(tmp_path / "d", path, progress=False)


def test_bpe_corpus(tmp_path):
    texts = make_text_dir(tmp_path / "src")
    m = build_corpus(tmp_path / "c", tmp_path / "src", tokenizer="bpe", bpe_vocab=300,
                     split="0.6,0.2,0.2", progress=False)
    assert (tmp_path / "c" / "tokenizer.json").is_file()
    tok = load_tokenizer(tmp_path / "c")
    assert tok.name == "bpe" and m["tokenizer"]["vocab_size"] == tok.vocab_size
    for s in SPLITS:
        cs = CorpusSplit.open(tmp_path / "c", s)
        assert int(tok.token_bytes[cs.tokens].sum()) == m["splits"][s]["bytes"]
        for i, name in enumerate(cs.names):
            assert tok.decode(cs.doc(i)) == texts[name]


def test_stdlib_source_small(tmp_path):
    kw = dict(max_docs=25, split="0.6,0.2,0.2", progress=False)
    m1 = build_corpus(tmp_path / "a", "stdlib", **kw)
    m2 = build_corpus(tmp_path / "b", "stdlib", **kw)
    assert m1["sha256"] == m2["sha256"] and m1["source"]["kind"] == "stdlib"
    names = [n for s in SPLITS for n in CorpusSplit.open(tmp_path / "a", s).names]
    assert len(names) + m1["skipped"]["empty"] == 25
    for name in names:
        parts = name.split("/")
        assert name.endswith(".py") and not parts[-1].startswith("test_")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts)


def test_stdlib_excludes_tests():
    from memformers.data.sources import list_files, resolve_source

    spec = resolve_source("stdlib")
    rels = list_files(spec.path, ["**/*.py"], [], stdlib=True)
    assert "os.py" in rels and "json/__init__.py" in rels
    assert rels == sorted(rels)
    assert not [r for r in rels if r.startswith(("test/", "idlelib/idle_test/",
                                                 "lib2to3/tests/", "site-packages/"))]


def test_overwrite_and_atomicity(tmp_path):
    make_text_dir(tmp_path / "src")
    build_corpus(tmp_path / "c", tmp_path / "src", split="1,0,0", progress=False)
    with pytest.raises(MemformersError, match="already exists.*--overwrite"):
        build_corpus(tmp_path / "c", tmp_path / "src", split="1,0,0", progress=False)
    m = build_corpus(tmp_path / "c", tmp_path / "src", split="0.6,0.2,0.2", overwrite=True,
                     progress=False)
    assert open_corpus_manifest(tmp_path / "c")["sha256"] == m["sha256"]
    # a failed build leaves no temporary directories behind
    with pytest.raises(MemformersError):
        build_corpus(tmp_path / "d", tmp_path / "src", split="1,1,0", include=["nothing"],
                     progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "src"]


def test_errors(tmp_path):
    with pytest.raises(MemformersError, match="corpus source not found"):
        build_corpus(tmp_path / "c", tmp_path / "missing", progress=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\x00\x01")
    with pytest.raises(MemformersError, match="no documents found in .*1 binary"):
        build_corpus(tmp_path / "c", tmp_path / "bin", progress=False)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("just one document")
    with pytest.raises(MemformersError, match="split is empty.*--split"):
        build_corpus(tmp_path / "c", tmp_path / "one", progress=False)
    with pytest.raises(MemformersError, match="three non-negative"):
        build_corpus(tmp_path / "c", tmp_path / "one", split="1,0", progress=False)
    with pytest.raises(MemformersError, match="not a memformers corpus: missing"):
        CorpusSplit.open(tmp_path / "one", "train")


def test_verify_detects_corruption(tmp_path):
    make_text_dir(tmp_path / "src")
    build_corpus(tmp_path / "c", tmp_path / "src", split="1,0,0", progress=False)
    path = tmp_path / "c" / "train.tokens.bin"
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    open_corpus_manifest(tmp_path / "c")  # not verified: fine
    with pytest.raises(MemformersError, match="content hash does not match"):
        CorpusSplit.open(tmp_path / "c", "train", verify=True)


def test_default_corpus_dir():
    assert default_corpus_dir("bpe") == Path("data") / "stdlib-bpe"


def test_cli(tmp_path, capsys):
    make_text_dir(tmp_path / "src")
    parser = argparse.ArgumentParser(prog="memformers")
    add_data_subparser(parser.add_subparsers(dest="command"))
    out = tmp_path / "c"
    args = parser.parse_args(["data", "build", "--source", str(tmp_path / "src"), "--out",
                              str(out), "--split", "0.6,0.2,0.2", "--exclude", "**/sub/*",
                              "--quiet"])
    assert args.func(args) == 0 and (out / "manifest.json").is_file()
    args = parser.parse_args(["data", "stats", str(out), "--verify"])
    assert run_data_command(args) == 0
    printed = capsys.readouterr().out
    assert "content hash verified" in printed and "documents" in printed
    args = parser.parse_args(["data", "build", "--source", str(tmp_path / "src")])
    with pytest.raises(MemformersError, match="--out is required"):
        run_data_command(args)


def test_ensure_default_corpus_builds_once(monkeypatch, tmp_path):
    from memformers.data import corpus

    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_build(out, source, **kw):
        calls.append((out, source, kw["tokenizer"]))
        out.mkdir(parents=True)
        (out / "manifest.json").write_text("{}")

    monkeypatch.setattr(corpus, "build_corpus", fake_build)
    out = corpus.ensure_default_corpus("byte", progress=False)
    assert out == Path("data") / "stdlib-byte"
    assert corpus.ensure_default_corpus("byte", progress=False) == out
    assert calls == [(out, "stdlib", "byte")]


def test_concat_splits_mixes_corpora(tmp_path):
    from memformers.tasks.passkey import build_passkey_corpus

    make_text_dir(tmp_path / "src")
    build_corpus(tmp_path / "a", str(tmp_path / "src"), split="1,0,0", progress=False)
    build_passkey_corpus(tmp_path / "pk", 3, 300, 400, seed=1)
    a, pk = CorpusSplit.open(tmp_path / "a"), CorpusSplit.open(tmp_path / "pk")
    mixed = CorpusSplit.concat([a, pk])
    assert mixed.n_docs == a.n_docs + pk.n_docs == a.n_docs + 3
    for i in range(a.n_docs):
        assert np.array_equal(mixed.doc(i), a.doc(i))
    for j in range(3):
        text = bytes(mixed.doc(a.n_docs + j).astype(np.uint8)).decode()
        assert 300 <= pk.doc_len(j) <= 400 + 8 and text.count("The pass key is") == 2
        key = text.rsplit(" ", 1)[-1]
        assert text.endswith(f"What is the pass key? The pass key is {key}")
        assert text.count(f"{key} is the pass key.") == 1
    build_corpus(tmp_path / "b", str(tmp_path / "src"), tokenizer="bpe", bpe_vocab=300,
                 split="1,0,0", progress=False)
    with pytest.raises(MemformersError, match="different tokenizers"):
        CorpusSplit.concat([a, CorpusSplit.open(tmp_path / "b")])
