"""Where documents come from: the Python stdlib, a directory, a .jsonl file, a HF dataset.

Every source yields ``(name, text)`` pairs in a deterministic order; ``name``
is unique within the source (a relative path, ``file.jsonl:LINE`` or
``split/INDEX``) and decides the train/valid/test split by its hash.
Files that are binary (a NUL byte in the first 8 KB) or not UTF-8 are
skipped and counted in ``Skipped``; so are whitespace-only documents.
"""

from __future__ import annotations

import json
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from memformers.errors import MemformersError

STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                        "__pycache__"}
GROUP_HEADER = "# ==== {path} ====\n"


@dataclass
class Skipped:
    """Counts of documents dropped while reading a source."""

    binary: int = 0
    undecodable: int = 0
    empty: int = 0
    outside_links: int = 0  # symlinks to files outside the source directory


@dataclass
class SourceSpec:
    """A resolved source: its kind and location."""

    kind: str  # "stdlib" | "dir" | "jsonl" | "hf"
    path: Path


def resolve_source(source: str | Path, kind: str = "auto") -> SourceSpec:
    """Turn ``"stdlib"`` or a path into a ``SourceSpec``; ``kind`` forces one."""
    if kind == "stdlib" or (kind == "auto" and str(source) == "stdlib"):
        return SourceSpec("stdlib", Path(sysconfig.get_paths()["stdlib"]))
    path = Path(source).expanduser()
    if not path.exists():
        raise MemformersError(f"corpus source not found: {path} (expected 'stdlib', a "
                              "directory of text files, a .jsonl file or a HF dataset dir)")
    if kind == "auto":
        if path.is_file():
            kind = "jsonl"
        elif (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            kind = "hf"
        else:
            kind = "dir"
    if kind not in ("dir", "jsonl", "hf"):
        raise MemformersError(f"unknown source kind '{kind}' (expected stdlib, dir, jsonl, hf)")
    if kind == "jsonl" and not path.is_file():
        raise MemformersError(f"jsonl source must be a file: {path}")
    if kind in ("dir", "hf") and not path.is_dir():
        raise MemformersError(f"{kind} source must be a directory: {path}")
    return SourceSpec(kind, path)


# --------------------------------------------------------------------------- globs


def glob_to_regex(pattern: str) -> re.Pattern:
    """Compile a path glob: ``**/`` = any number of directories, ``*`` and ``?``
    stay inside one path component. Matched against POSIX relative paths."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _selected(rel: str, include: list[re.Pattern], exclude: list[re.Pattern]) -> bool:
    return any(p.match(rel) for p in include) and not any(p.match(rel) for p in exclude)


def list_files(root: Path, include: Sequence[str], exclude: Sequence[str],
               stdlib: bool = False, skipped: Skipped | None = None,
               follow_links: bool = False) -> list[str]:
    """Sorted relative POSIX paths of the selected regular files under ``root``.

    With ``stdlib``, test directories, ``test_*.py`` files and site-packages
    are left out (and not even walked). Symlinks to files outside ``root`` are left
    out (counted in ``skipped.outside_links``) unless ``follow_links``: a link must not
    carry a file from elsewhere on the machine into a corpus.
    """
    real_root = Path(os.path.realpath(root))
    inc = [glob_to_regex(g) for g in include]
    exc = [glob_to_regex(g) for g in exclude]
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        if stdlib:
            dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
            filenames = [f for f in filenames if not f.startswith("test_")]
        base = Path(dirpath).relative_to(root).as_posix()
        for f in filenames:
            rel = f if base == "." else f"{base}/{f}"
            path = os.path.join(dirpath, f)
            if not (_selected(rel, inc, exc) and os.path.isfile(path)):
                continue
            if os.path.islink(path) and not follow_links and \
                    not Path(os.path.realpath(path)).is_relative_to(real_root):
                if skipped is not None:
                    skipped.outside_links += 1
                continue
            rels.append(rel)
    return sorted(rels)


# --------------------------------------------------------------------------- reading


def read_text_file(path: Path, skipped: Skipped) -> str | None:
    """The file's text, or None (counted in ``skipped``) if binary or not UTF-8."""
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        skipped.binary += 1
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        skipped.undecodable += 1
        return None


def _group_key(rel: str) -> str:
    """Top-level package/directory of a relative path (a top-level file is its own group)."""
    return rel.split("/", 1)[0]


def file_documents(root: Path, rels: list[str], skipped: Skipped,
                   group: bool = False) -> Iterator[tuple[str, str]]:
    """One document per file, or with ``group`` one per top-level directory.

    A group document concatenates its files in sorted relative-path order,
    each preceded by the line ``# ==== <relative path> ====``; it is named
    after the directory (or the top-level file).
    """
    if not group:
        for rel in rels:
            text = read_text_file(root / rel, skipped)
            if text is not None:
                yield rel, text
        return
    current, parts = None, []
    for rel in rels + [None]:  # sentinel flushes the last group
        key = _group_key(rel) if rel is not None else None
        if key != current and current is not None and parts:
            yield current, "".join(parts)
        if key != current:
            current, parts = key, []
        if rel is None:
            break
        text = read_text_file(root / rel, skipped)
        if text is None:
            continue
        if text and not text.endswith("\n"):
            text += "\n"
        parts.append(GROUP_HEADER.format(path=rel) + text)


def jsonl_documents(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    """One document per line of a .jsonl file, named ``<file name>:<line>``."""
    with path.open("r", encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MemformersError(f"{path}: line {lineno} is not valid JSON "
                                          f"({e.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise MemformersError(f"{path}: line {lineno} has no '{text_field}' "
                                          "field (set --text-field)")
                text = record[text_field]
                if not isinstance(text, str):
                    raise MemformersError(f"{path}: line {lineno}: field '{text_field}' "
                                          f"is not a string")
                yield f"{path.name}:{lineno}", text
        except UnicodeDecodeError:
            raise MemformersError(f"{path} is not UTF-8 text") from None


def hf_documents(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    """Rows of a dataset saved with ``datasets.save_to_disk``, named ``split/index``."""
    try:
        import datasets
    except ImportError:
        raise MemformersError("reading a HF dataset needs the `datasets` package: "
                              "pip install 'memformers[hf]'") from None
    ds = datasets.load_from_disk(str(path))
    parts = ([(name, ds[name]) for name in sorted(ds.keys())]
             if isinstance(ds, datasets.DatasetDict) else [("", ds)])
    for split, d in parts:
        if text_field not in d.column_names:
            raise MemformersError(f"HF dataset {path} has no column '{text_field}' "
                                  f"(columns: {', '.join(d.column_names)}; set --text-field)")
        for i, text in enumerate(d[text_field]):
            yield (f"{split}/{i}" if split else str(i)), text or ""
