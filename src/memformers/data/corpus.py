"""Build a tokenised corpus on disk and read it back memory-mapped.

Layout of a corpus directory::

    manifest.json            what was built, counts, content hash
    tokenizer.json           (BPE only) the tokenizer, trained on train split texts
    {split}.tokens.bin       all documents' tokens back to back, raw uint16/uint32
    {split}.offsets.npy      (n_docs + 1,) int64: document i is tokens[off[i]:off[i+1]]
    {split}.names.json       (n_docs,) document names, in the same order

for split in train, valid, test. Documents are assigned to a split by the
SHA-1 of their name, so a document keeps its split when others are added or
removed. A build is written into a temporary directory next to ``out_dir``
and renamed into place at the end, so a corpus directory is always complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from memformers.data.sources import (
    Skipped,
    SourceSpec,
    file_documents,
    hf_documents,
    jsonl_documents,
    list_files,
    resolve_source,
)
from memformers.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
)
from memformers.errors import MemformersError

FORMAT = "memformers-corpus"
VERSION = 1
SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"

Manifest = dict


# --------------------------------------------------------------------------- splitting


def split_fraction(name: str) -> float:
    """A stable pseudo-random number in [0, 1) from a document name."""
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def parse_split(split: Sequence[float] | str) -> tuple[float, float, float]:
    """Normalise ``(train, valid, test)`` fractions (or ``"0.9,0.05,0.05"``) to sum to 1."""
    try:
        parts = [float(x) for x in split.split(",")] if isinstance(split, str) else list(split)
    except ValueError:
        raise MemformersError(f"--split expects three numbers like 0.9,0.05,0.05; "
                              f"got '{split}'") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise MemformersError(f"split must be three non-negative fractions (train, valid, "
                              f"test) with a positive sum; got {split}")
    total = sum(parts)
    return (parts[0] / total, parts[1] / total, parts[2] / total)


def assign_split(name: str, fractions: tuple[float, float, float]) -> str:
    u = split_fraction(name)
    if u < fractions[0]:
        return "train"
    return "valid" if u < fractions[0] + fractions[1] else "test"


# --------------------------------------------------------------------------- building


def _documents(spec: SourceSpec, include: list[str], exclude: list[str], text_field: str,
               group: bool, follow_links: bool = False
               ) -> tuple[Iterator[tuple[str, str]], Skipped]:
    skipped = Skipped()
    if spec.kind in ("stdlib", "dir"):
        inc = list(include) or (["**/*.py"] if spec.kind == "stdlib" else ["**/*"])
        rels = list_files(spec.path, inc, exclude, stdlib=spec.kind == "stdlib",
                          skipped=skipped, follow_links=follow_links)
        docs = file_documents(spec.path, rels, skipped, group=group)
    elif spec.kind == "jsonl":
        docs = jsonl_documents(spec.path, text_field)
    else:
        docs = hf_documents(spec.path, text_field)
    return docs, skipped


def _length_histogram(lengths: np.ndarray) -> dict[str, int]:
    """Counts of documents by token length bucket [2^k, 2^(k+1)), keyed by 2^k."""
    hist: dict[str, int] = {}
    for n in np.asarray(lengths, dtype=np.int64):
        key = "0" if n == 0 else str(1 << (int(n).bit_length() - 1))
        hist[key] = hist.get(key, 0) + 1
    return dict(sorted(hist.items(), key=lambda kv: int(kv[0])))


def _tokenize(tok: Tokenizer, texts: list[str], desc: str, progress: bool) -> Iterator[np.ndarray]:
    """Token arrays of ``texts``, in order, in batches (BPE encodes a batch in parallel)."""
    bar = tqdm(total=len(texts), desc=desc, unit="doc", disable=not progress, leave=False)
    step = 64
    for i in range(0, len(texts), step):
        chunk = texts[i:i + step]
        if isinstance(tok, ByteTokenizer):
            arrays = [tok.encode_array(t) for t in chunk]
        else:
            arrays = [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(chunk)]
        yield from arrays
        bar.update(len(chunk))
    bar.close()


def _write_split(tmp: Path, split: str, names: list[str], texts: list[str], tok: Tokenizer,
                 dtype: np.dtype, hasher, progress: bool) -> dict:
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    n_bytes = 0
    with open(tmp / f"{split}.tokens.bin", "wb") as f:
        for i, (text, ids) in enumerate(zip(texts, _tokenize(tok, texts, split, progress))):
            raw = ids.astype(dtype, copy=False).tobytes()
            f.write(raw)
            hasher.update(raw)
            offsets[i + 1] = offsets[i] + len(ids)
            n_bytes += len(text.encode("utf-8"))
    np.save(tmp / f"{split}.offsets.npy", offsets)
    hasher.update(offsets.tobytes())
    (tmp / f"{split}.names.json").write_text(json.dumps(names))
    return {"documents": len(texts), "tokens": int(offsets[-1]), "bytes": n_bytes,
            "length_histogram": _length_histogram(np.diff(offsets))}


def build_corpus(
    out_dir: str | Path,
    source: str | Path = "stdlib",
    *,
    tokenizer: str = "byte",
    bpe_vocab: int = 4096,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    text_field: str = "text",
    split: Sequence[float] | str = (0.9, 0.05, 0.05),
    max_docs: int = 0,
    group: bool = False,
    overwrite: bool = False,
    source_kind: str = "auto",
    progress: bool = True,
    follow_links: bool = False,
) -> Manifest:
    """Read ``source``, split and tokenise it, and write a corpus into ``out_dir``.

    ``source`` is ``"stdlib"`` (this interpreter's standard library ``*.py``
    files without tests), a directory of text files (filtered by ``include``/
    ``exclude`` globs, default all files), a ``.jsonl`` file (``text_field``
    per line) or a HF dataset saved with ``save_to_disk`` (``source_kind="hf"``
    or auto-detected). ``group`` makes one document per top-level directory
    (see ``sources.file_documents``). ``max_docs`` keeps the first N documents
    in source order (0 = all). Returns the manifest (also in ``manifest.json``).
    """
    out_dir = Path(out_dir).expanduser()
    hf_model = tokenizer[3:] if tokenizer.startswith("hf:") else ""  # a HF model's tokenizer
    reuse = tokenizer not in ("byte", "bpe") and not hf_model  # a corpus dir's tokenizer
    if reuse and not (Path(tokenizer).expanduser() / MANIFEST).is_file():
        raise MemformersError(f"tokenizer must be 'byte', 'bpe', 'hf:MODEL' (a Hugging Face "
                              f"model's tokenizer) or a corpus directory whose tokenizer to "
                              f"reuse; got '{tokenizer}'")
    hf_tok = HFTokenizer.for_model(hf_model) if hf_model else None  # fail before reading
    if max_docs < 0:
        raise MemformersError(f"max_docs must be >= 0, got {max_docs}")
    if out_dir.exists() and not out_dir.is_dir():
        raise MemformersError(f"--out {out_dir} is a file, not a directory")
    if tokenizer == "bpe" and not 257 <= bpe_vocab <= 1 << 20:
        raise MemformersError(f"--bpe-vocab must be in 257..{1 << 20} (bytes + merges), "
                              f"got {bpe_vocab}")
    if (out_dir / MANIFEST).exists() and not overwrite:
        raise MemformersError(f"corpus already exists: {out_dir} (pass --overwrite to rebuild)")
    if out_dir.exists() and not (out_dir / MANIFEST).exists() and any(out_dir.iterdir()):
        raise MemformersError(f"{out_dir} exists and is not a memformers corpus; "
                              "choose another --out")
    fractions = parse_split(split)
    spec = resolve_source(source, source_kind)
    include, exclude = list(include), list(exclude)

    # read: (name, text) in source order, dropping whitespace-only documents
    docs, skipped = _documents(spec, include, exclude, text_field, group, follow_links)
    if max_docs:
        docs = itertools.islice(docs, max_docs)
    by_split: dict[str, tuple[list[str], list[str]]] = {s: ([], []) for s in SPLITS}
    seen: set[str] = set()
    for name, text in tqdm(docs, desc="reading", unit="doc", disable=not progress, leave=False):
        if name in seen:
            raise MemformersError(f"duplicate document name '{name}' in {spec.path}")
        seen.add(name)
        if not text.strip():
            skipped.empty += 1
            continue
        names, texts = by_split[assign_split(name, fractions)]
        names.append(name)
        texts.append(text)
    if not any(by_split[s][0] for s in SPLITS):
        raise MemformersError(f"no documents found in {spec.path} (include={include or 'default'}"
                              f", exclude={exclude}; skipped {skipped.binary} binary, "
                              f"{skipped.undecodable} undecodable, {skipped.empty} empty)")
    for s, frac in zip(SPLITS, fractions):
        if frac > 0 and not by_split[s][0]:
            raise MemformersError(f"the {s} split is empty ({len(seen)} documents, fractions "
                                  f"{','.join(f'{f:g}' for f in fractions)}); use more "
                                  f"documents or a larger {s} fraction with --split")

    # tokenise and write into a temporary directory, then rename into place
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if hf_tok is not None:
            tok: Tokenizer = hf_tok
            tok.save(tmp)
        elif reuse:
            tok = load_tokenizer(Path(tokenizer).expanduser())
            tok.save(tmp)  # nothing for the byte tokenizer
        elif tokenizer == "bpe":
            tok = BPETokenizer.train(by_split["train"][1], bpe_vocab)
            tok.save(tmp)
        else:
            tok = ByteTokenizer()
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)
        hasher = hashlib.sha256()
        split_stats = {s: _write_split(tmp, s, *by_split[s], tok, dtype, hasher, progress)
                       for s in SPLITS}
        manifest: Manifest = {
            "format": FORMAT,
            "version": VERSION,
            "source": {"kind": spec.kind, "path": str(spec.path), "include": include,
                       "exclude": exclude, "text_field": text_field, "group": group,
                       "max_docs": max_docs,
                       "python": sys.version.split()[0] if spec.kind == "stdlib" else None},
            "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size,
                          **({"model": hf_model} if hf_model else {})},
            "dtype": dtype.name,
            "split_fractions": list(fractions),
            "splits": split_stats,
            "skipped": {"binary": skipped.binary, "undecodable": skipped.undecodable,
                        "empty": skipped.empty, "outside_links": skipped.outside_links},
            "sha256": hasher.hexdigest(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished build ``tmp`` to ``out_dir``, replacing an old corpus there."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError as e:
        if old is not None:
            old.rename(out_dir)
        raise MemformersError(f"could not move the built corpus into {out_dir}: {e}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- reading


def content_hash(corpus_dir: str | Path) -> str:
    """SHA-256 over each split's token bytes then offsets, in SPLITS order."""
    d = Path(corpus_dir)
    hasher = hashlib.sha256()
    for s in SPLITS:
        with open(d / f"{s}.tokens.bin", "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                hasher.update(block)
        hasher.update(np.load(d / f"{s}.offsets.npy").astype(np.int64).tobytes())
    return hasher.hexdigest()


def open_corpus_manifest(corpus_dir: str | Path, verify: bool = False) -> Manifest:
    """Load ``manifest.json``; with ``verify`` also recompute and check the content hash."""
    d = Path(corpus_dir).expanduser()
    path = d / MANIFEST
    if not path.is_file():
        raise MemformersError(f"not a memformers corpus: missing {path}; build one with "
                              "`memformers data build`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise MemformersError(f"corrupt corpus manifest: {path}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise MemformersError(f"{path} is not a version-{VERSION} memformers corpus manifest; "
                              "rebuild with `memformers data build --overwrite`")
    if verify:
        try:
            actual = content_hash(d)
        except FileNotFoundError as e:
            raise MemformersError(f"corpus {d} is incomplete: missing {e.filename}") from None
        if actual != manifest["sha256"]:
            raise MemformersError(f"corpus {d} is corrupt: content hash does not match "
                                  "manifest.json; rebuild it with --overwrite")
    return manifest


class CorpusSplit:
    """One split of a corpus: memory-mapped tokens and document offsets."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, names: list[str],
                 manifest: Manifest, split: str) -> None:
        self.tokens = tokens  # (num_tokens,) uint16/uint32, read-only
        self.offsets = offsets  # (n_docs + 1,) int64
        self.names = names
        self.manifest = manifest
        self.split = split
        self.vocab_size: int = manifest["tokenizer"]["vocab_size"]

    @classmethod
    def open(cls, corpus_dir: str | Path, split: str = "train",
             verify: bool = False) -> CorpusSplit:
        if split not in SPLITS:
            raise MemformersError(f"unknown split '{split}' (expected {', '.join(SPLITS)})")
        d = Path(corpus_dir).expanduser()
        manifest = open_corpus_manifest(d, verify=verify)
        try:
            offsets = np.load(d / f"{split}.offsets.npy", allow_pickle=False)
            if offsets.dtype.kind not in "iu" or offsets.ndim != 1 or len(offsets) == 0 \
                    or (np.diff(offsets) < 0).any() or offsets[0] != 0:
                raise ValueError("offsets are not a non-decreasing integer array from 0")
            dtype = np.dtype(manifest["dtype"])
            n = int(offsets[-1])
            path = d / f"{split}.tokens.bin"
            if n and path.stat().st_size < n * dtype.itemsize:
                raise ValueError(f"{path.name} holds {path.stat().st_size} bytes, the offsets "
                                 f"need {n * dtype.itemsize}")
            tokens = np.zeros(0, dtype=dtype) if n == 0 else \
                np.memmap(path, dtype=dtype, mode="r", shape=(n,))
            names = json.loads((d / f"{split}.names.json").read_text())
            if not isinstance(names, list) or len(names) != len(offsets) - 1:
                raise ValueError("names.json does not list one name per document")
        except (OSError, ValueError, TypeError) as e:  # missing, truncated or foreign files
            msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise MemformersError(f"corpus {d}, {split} split is damaged ({msg}; file "
                                  f"{getattr(e, 'filename', None) or 'see above'}); rebuild "
                                  f"it with memformers data build") from None
        return cls(tokens, offsets, names, manifest, split)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc_len(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document ``i``: (doc_len(i),) view into the memmap."""
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} out of range (split has {self.n_docs})")
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def __len__(self) -> int:
        return self.n_docs

    @classmethod
    def concat(cls, splits: list[CorpusSplit]) -> CorpusSplit:
        """One split holding the documents of several corpora (same tokenizer), in RAM."""
        first = splits[0]
        for other in splits[1:]:
            if other.manifest["tokenizer"] != first.manifest["tokenizer"]:
                raise MemformersError(
                    "cannot mix corpora with different tokenizers: "
                    f"{first.manifest['tokenizer']} vs {other.manifest['tokenizer']}")
        if len(splits) == 1:
            return first
        dtype = np.result_type(*[s.tokens.dtype for s in splits])
        tokens = np.concatenate([np.asarray(s.tokens, dtype=dtype) for s in splits])
        starts = np.cumsum([0] + [s.num_tokens for s in splits[:-1]])
        offsets = np.concatenate([[0]] + [s.offsets[1:] + b for s, b in zip(splits, starts)])
        names = [n for s in splits for n in s.names]
        return cls(tokens, offsets.astype(np.int64), names, first.manifest, first.split)


# --------------------------------------------------------------------------- stats


def format_stats(manifest: Manifest) -> str:
    """Human-readable corpus statistics."""
    src, tok = manifest["source"], manifest["tokenizer"]
    lines = [f"source     {src['kind']}: {src['path']}" + ("  (grouped)" if src["group"] else ""),
             f"tokenizer  {tok['name']} (vocab {tok['vocab_size']}, {manifest['dtype']})",
             f"sha256     {manifest['sha256'][:16]}...",
             "",
             f"{'split':<8}{'documents':>12}{'tokens':>15}{'bytes':>15}{'bytes/token':>13}"]
    for s in SPLITS:
        st = manifest["splits"][s]
        bpt = st["bytes"] / st["tokens"] if st["tokens"] else 0.0
        lines.append(f"{s:<8}{st['documents']:>12,}{st['tokens']:>15,}{st['bytes']:>15,}"
                     f"{bpt:>13.2f}")
    sk = manifest["skipped"]
    lines += ["", f"skipped    {sk['binary']} binary, {sk['undecodable']} undecodable, "
                  f"{sk['empty']} empty, {sk.get('outside_links', 0)} links to files outside "
                  f"the source", "", "document length (tokens)   " +
              "".join(f"{s:>8}" for s in SPLITS)]
    buckets = sorted({int(k) for s in SPLITS for k in manifest["splits"][s]["length_histogram"]})
    for b in buckets:
        label = "0" if b == 0 else f"[{b}, {2 * b})"
        counts = [manifest["splits"][s]["length_histogram"].get(str(b), 0) for s in SPLITS]
        lines.append(f"  {label:<25}" + "".join(f"{c:>8}" for c in counts))
    return "\n".join(lines)


# --------------------------------------------------------------------------- default corpus


def default_corpus_dir(tokenizer: str = "byte") -> Path:
    """``data/stdlib-<tokenizer>`` under the working directory (the configs' default)."""
    return Path("data") / f"stdlib-{tokenizer}"


def ensure_default_corpus(tokenizer: str = "byte", progress: bool = True) -> Path:
    """Build the stdlib corpus in ``default_corpus_dir`` unless it is already there."""
    out = default_corpus_dir(tokenizer)
    if not (out / MANIFEST).is_file():
        try:
            build_corpus(out, "stdlib", tokenizer=tokenizer, progress=progress)
        except MemformersError:
            if not (out / MANIFEST).is_file():  # not just a concurrent build that won
                raise
    return out
