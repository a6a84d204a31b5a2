"""Tokenizers are lossless and count bytes exactly."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memformers.data.tokenizer import BPETokenizer, ByteTokenizer, byte_level_alphabet
from memformers.errors import MemformersError

TRAIN_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
] * 5

UNSEEN = [
    "",
    " leading space and  double  spaces ",
    "emoji 😀🚀 and CJK 漢字, Ünïcödé, ‮RTL‬ \x00 NUL \r\n tabs\t",
    "\U0010ffff\ud7ff surrogate-adjacent",
    "a" * 1000,
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TRAIN_TEXTS, vocab_size=300)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_roundtrip_and_byte_count(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < 256 for i in ids)
    assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_byte_decode_replaces_invalid_utf8():
    assert ByteTokenizer().decode([0xFF, ord("a")]) == "\ufffda"


def test_byte_level_alphabet_covers_every_byte():
    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    from tokenizers import pre_tokenizers

    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())


def test_bpe_learns_merges(bpe):
    assert bpe.vocab_size == 300
    assert bpe.token_bytes.dtype == np.int32 and len(bpe.token_bytes) == 300
    assert bpe.token_bytes.min() == 1 and bpe.token_bytes.max() > 1
    text = TRAIN_TEXTS[0]
    assert len(bpe.encode(text)) < len(text.encode())  # merges actually compress


@pytest.mark.parametrize("text", TRAIN_TEXTS[:4] + UNSEEN)
def test_bpe_roundtrip_and_byte_count(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert int(bpe.token_bytes[ids].sum()) == len(text.encode("utf-8"))


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_bpe_roundtrip_random_text(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert int(bpe.token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_bpe_save_load_identical(bpe, tmp_path):
    bpe.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = BPETokenizer.load(tmp_path)
    assert loaded.vocab_size == bpe.vocab_size
    np.testing.assert_array_equal(loaded.token_bytes, bpe.token_bytes)
    for text in TRAIN_TEXTS[:4] + UNSEEN:
        assert loaded.encode(text) == bpe.encode(text)


def test_bpe_training_is_deterministic(bpe):
    again = BPETokenizer.train(TRAIN_TEXTS, vocab_size=300)
    assert again.encode(UNSEEN[2] + TRAIN_TEXTS[1]) == bpe.encode(UNSEEN[2] + TRAIN_TEXTS[1])


def test_bpe_errors(tmp_path):
    with pytest.raises(MemformersError, match="at least 256"):
        BPETokenizer.train(TRAIN_TEXTS, vocab_size=100)
    with pytest.raises(MemformersError, match="not found"):
        BPETokenizer.load(tmp_path)
