"""Tokenizers: raw bytes (vocab 256) or a byte-level BPE trained locally.

Both are lossless on any text: every UTF-8 byte is representable, so
``decode(encode(text)) == text``. ``token_bytes[i]`` is the number of UTF-8
bytes token ``i`` stands for, so that for any text
``token_bytes[encode(text)].sum() == len(text.encode())``; evaluation uses it
to turn nats per token into bits per byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from memformers.errors import MemformersError

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """The interface the rest of memformers uses."""

    name: str
    vocab_size: int
    token_bytes: np.ndarray  # (vocab_size,) int32

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        """Write whatever ``load_tokenizer`` needs into ``directory`` (may be nothing)."""


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte: id = byte value."""

    name = "byte"
    vocab_size = 256

    def __init__(self) -> None:
        self.token_bytes = np.ones(256, dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path used by corpus building: (n_bytes,) uint8."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """Map each printable stand-in character of byte-level BPE back to its byte.

    Byte-level BPE (GPT-2) writes byte ``b`` as ``chr(b)`` when that character
    is printable Latin-1, and otherwise as ``chr(256 + k)`` for the k-th
    non-printable byte in increasing order.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    char_to_byte: dict[str, int] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            char_to_byte[chr(b)] = b
        else:
            char_to_byte[chr(256 + extra)] = b
            extra += 1
    return char_to_byte


class BPETokenizer(Tokenizer):
    """Byte-level BPE on top of HF ``tokenizers`` (no special tokens)."""

    name = "bpe"

    def __init__(self, hf_tokenizer) -> None:  # a tokenizers.Tokenizer
        self._tok = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()
        alphabet = byte_level_alphabet()
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for token, idx in hf_tokenizer.get_vocab().items():
            if any(ch not in alphabet for ch in token):
                raise MemformersError(f"BPE token {token!r} is not byte-level; "
                                      "the tokenizer was not made by memformers")
            lengths[idx] = len(token)  # one stand-in character per byte
        self.token_bytes = lengths

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096) -> BPETokenizer:
        """Learn merges from ``texts``; deterministic for the same texts in the same order."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 256:
            raise MemformersError(f"BPE vocab size must be at least 256 (one token per "
                                  f"byte), got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        self._tok.save(str(Path(directory) / TOKENIZER_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise MemformersError(f"BPE tokenizer not found: {path}")
        return cls(HFTokenizer.from_file(str(path)))


def make_tokenizer(name: str) -> Tokenizer:
    """An untrained tokenizer by name (only ``byte`` needs no training)."""
    if name == "byte":
        return ByteTokenizer()
    raise MemformersError(f"tokenizer '{name}' must be trained; use BPETokenizer.train")


def load_tokenizer(corpus_dir: str | Path) -> Tokenizer:
    """The tokenizer a corpus was built with, as named in its ``manifest.json``."""
    path = Path(corpus_dir) / "manifest.json"
    if not path.is_file():
        raise MemformersError(f"not a memformers corpus: missing {path}; "
                              "build one with `memformers data build`")
    name = json.loads(path.read_text())["tokenizer"]["name"]
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        return BPETokenizer.load(corpus_dir)
    raise MemformersError(f"unknown tokenizer '{name}' in {path} (expected byte or bpe)")
