"""Tokenizers: raw bytes (vocab 256), a byte-level BPE trained locally, or a HF model's.

The byte and BPE tokenizers are lossless on any text: every UTF-8 byte is
representable, so ``decode(encode(text)) == text`` (a HF model's tokenizer is
whatever that model uses). ``token_bytes[i]`` is the number of UTF-8
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


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (a ``tokenizer.json``, read by ``tokenizers``).

    Used for the tokenizer of a Hugging Face model (``--tokenizer hf:PATH``) and,
    as ``BPETokenizer``, for the BPE memformers trains itself. Text is encoded
    without special tokens. ``token_bytes``: a byte-level tokenizer (GPT-2,
    Llama 3, Qwen2) writes one stand-in character per byte; otherwise
    (SentencePiece-style: Llama 2, Mistral) a token counts its UTF-8 bytes with
    "\u2581" as a space and "<0xNN>" as one byte. Special tokens count 0 bytes.
    """

    name = "hf"

    def __init__(self, hf_tokenizer) -> None:  # a tokenizers.Tokenizer
        self._tok = hf_tokenizer
        vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.token_bytes = self._token_bytes(vocab)

    def _token_bytes(self, vocab: dict[str, int]) -> np.ndarray:
        spec = json.loads(self._tok.to_str())
        parts = [spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}]
        parts += [p for part in parts[:] for p in part.get("pretokenizers", []) +
                  part.get("decoders", [])]
        byte_level = any(p.get("type") == "ByteLevel" for p in parts)
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        alphabet = byte_level_alphabet()
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for token, idx in vocab.items():
            if idx in special:
                continue
            if byte_level and all(ch in alphabet for ch in token):
                lengths[idx] = len(token)
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                lengths[idx] = 1  # SentencePiece byte fallback
            else:
                lengths[idx] = len(token.replace("\u2581", " ").encode("utf-8"))
        return lengths

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
    def load(cls, directory: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer as HFTok

        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise MemformersError(f"tokenizer not found: {path}")
        try:
            return cls(HFTok.from_file(str(path)))
        except Exception as e:  # tokenizers raises its own exception type
            raise MemformersError(f"cannot read tokenizer {path}: {e}") from None

    @classmethod
    def for_model(cls, source: str) -> HFTokenizer:
        """The tokenizer of a Hugging Face model: a local directory or a Hub name."""
        if Path(source).expanduser().is_dir():
            return cls.load(Path(source).expanduser())
        from tokenizers import Tokenizer as HFTok

        try:
            return cls(HFTok.from_pretrained(source))
        except Exception as e:
            raise MemformersError(f"cannot load the tokenizer of '{source}': not a local "
                                  f"directory and not on the Hub ({e.__class__.__name__})"
                                  ) from None


class BPETokenizer(HFTokenizer):
    """Byte-level BPE trained by memformers (no special tokens)."""

    name = "bpe"

    def _token_bytes(self, vocab: dict[str, int]) -> np.ndarray:
        alphabet = byte_level_alphabet()
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for token, idx in vocab.items():
            if any(ch not in alphabet for ch in token):
                raise MemformersError(f"BPE token {token!r} is not byte-level; "
                                      "the tokenizer was not made by memformers")
            lengths[idx] = len(token)  # one stand-in character per byte
        return lengths

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096) -> BPETokenizer:
        """Learn merges from ``texts``; deterministic for the same texts in the same order."""
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 256:
            raise MemformersError(f"BPE vocab size must be at least 256 (one token per "
                                  f"byte), got {vocab_size}")
        tok = HFTok(models.BPE())
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


def byte_tokenizer_json() -> HFTokenizer:
    """memformers' byte tokenizer (id = byte value) as a ``tokenizers`` tokenizer.

    A byte-level BPE with the 256 stand-in characters as its vocabulary and no
    merges: every byte becomes its own token, with the same ids as
    ``ByteTokenizer``. Saved as the ``tokenizer.json`` of byte-vocabulary models
    exported to Hugging Face format, so their directories are self-contained.
    """
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {ch: b for ch, b in byte_level_alphabet().items()}
    tok = HFTok(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return HFTokenizer(tok)


def as_hf_tokenizer(tok: Tokenizer) -> HFTokenizer:
    """The same tokenization as a ``tokenizers`` tokenizer (to ship with an HF model)."""
    if isinstance(tok, HFTokenizer):
        return tok
    if isinstance(tok, ByteTokenizer):
        return byte_tokenizer_json()
    raise MemformersError(f"no Hugging Face form of tokenizer '{tok.name}'")


PROBE_TEXT = ("def f(x):\n\treturn x ** 2  # caf\u00e9, \u00fcber, \u4f60\u597d \U0001f642\n\n"
              "    1234567890 'quote' \"dq\" <tag/> {a: [1, 2]}  \r\n")


def tokenizers_match(a: Tokenizer, b: Tokenizer) -> bool:
    """True if ``a`` and ``b`` have the same vocabulary size and encode a probe text alike."""
    return a.vocab_size == b.vocab_size and a.encode(PROBE_TEXT) == b.encode(PROBE_TEXT)


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
    if name == "hf":
        return HFTokenizer.load(corpus_dir)
    raise MemformersError(f"unknown tokenizer '{name}' in {path} (expected byte, bpe or hf)")
