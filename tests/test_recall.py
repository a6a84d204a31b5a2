import re

import numpy as np
import pytest

from memformers.data.tokenizer import ByteTokenizer
from memformers.errors import MemformersError
from memformers.tasks.passkey import FILLER_SENTENCES
from memformers.tasks.recall import (
    PAIR,
    PREFIX,
    QUERY,
    make_recall_example,
    recall_accuracy,
    recall_training_batch,
    recall_training_example,
)


class WordTokenizer:
    """Whitespace-kept word pieces with a growing vocabulary: multi-byte tokens."""

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.words: list[str] = []

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        out = []
        for w in re.findall(r"\s*\S+|\s+", text):
            if w not in self.ids:
                self.ids[w] = len(self.words)
                self.words.append(w)
            out.append(self.ids[w])
        return out

    def decode(self, ids) -> str:
        return "".join(self.words[int(i)] for i in ids)


TOKENIZERS = [ByteTokenizer, WordTokenizer]
FILLER = "".join(FILLER_SENTENCES)


@pytest.mark.parametrize("make_tok", TOKENIZERS, ids=["byte", "word"])
@pytest.mark.parametrize("length,n_pairs,n_queries", [(600, 4, 4), (2000, 16, 5), (900, 8, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_recall_example_is_well_formed(make_tok, length, n_pairs, n_queries, seed):
    tok = make_tok()
    ex = make_recall_example(tok, length, n_pairs, n_queries, np.random.default_rng(seed))
    assert ex.tokens.shape == ex.targets.shape == (length,)
    assert len(ex.keys) == len(set(ex.keys)) == n_pairs
    assert all(re.fullmatch(r"[A-Z]{4}", k) for k in ex.keys)
    assert all(re.fullmatch(r"\d{4}", v) for v in ex.values)
    assert len(ex.queries) == len(set(ex.queries)) == n_queries

    context = tok.decode(ex.tokens[:ex.context_end])
    assert context.startswith(PREFIX)
    for k, v in zip(ex.keys, ex.values):
        assert context.count(k) == 1  # every key exactly once in the context...
        assert context.count(PAIR.format(key=k, value=v)) == 1  # ...in its pair sentence
    # pairs in context order at pair_starts; the rest is the (cut) repeated filler
    rest = context[len(PREFIX):]
    for k, v, start in zip(ex.keys, ex.values, ex.pair_starts):
        pair = PAIR.format(key=k, value=v)
        assert tok.decode(ex.tokens[start:start + len(tok.encode(pair))]) == pair
        rest = rest.replace(pair, "")
    assert ex.pair_starts == sorted(ex.pair_starts)
    assert (FILLER * (len(rest) // len(FILLER) + 1)).startswith(rest)

    # queries: question, answer = the queried key's value, and nothing else is a target
    on = np.zeros(length, dtype=bool)
    for q, (s, e) in zip(ex.queries, ex.answer_spans):
        assert tok.decode(ex.tokens[s:e]) == " " + ex.values[q]
        question = QUERY.format(key=ex.keys[q])
        assert tok.decode(ex.tokens[s - len(tok.encode(question)):s]) == question
        assert np.array_equal(ex.targets[s - 1:e - 1], ex.tokens[s:e])
        on[s - 1:e - 1] = True
    assert (ex.targets[~on] == -100).all()
    assert ex.answer_spans[0][0] > ex.context_end
    assert tok.decode(ex.tokens).endswith(". ")


def test_keys_spread_over_the_context():
    tok = ByteTokenizer()
    ex = make_recall_example(tok, 5000, 32, 8, np.random.default_rng(0))
    starts = np.asarray(ex.pair_starts) / ex.context_end
    assert starts.min() < 0.2 and starts.max() > 0.8


def test_seeds_and_determinism():
    tok = ByteTokenizer()
    a = make_recall_example(tok, 800, 6, 3, np.random.default_rng(7))
    b = make_recall_example(tok, 800, 6, 3, np.random.default_rng(7))
    c = make_recall_example(tok, 800, 6, 3, np.random.default_rng(8))
    assert np.array_equal(a.tokens, b.tokens) and not np.array_equal(a.tokens, c.tokens)


def test_errors():
    tok = ByteTokenizer()
    with pytest.raises(MemformersError):
        make_recall_example(tok, 100, 8, 4, np.random.default_rng(0))  # too short
    with pytest.raises(MemformersError):
        make_recall_example(tok, 2000, 3, 4, np.random.default_rng(0))  # more queries than pairs
    with pytest.raises(MemformersError):
        make_recall_example(tok, 2000, 3, 0, np.random.default_rng(0))


def test_training_forms_and_accuracy():
    tok = ByteTokenizer()
    tokens, targets = recall_training_example(tok, 700, 5, 4, np.random.default_rng(2))
    assert tokens.shape == targets.shape == (700,)
    assert (targets != -100).sum() == 4 * 5  # 4 answers of " dddd"
    xs, ys = recall_training_batch(tok, 3, 700, 5, 4, np.random.default_rng(2))
    assert xs.shape == ys.shape == (3, 700)
    assert np.array_equal(xs[0], tokens) and np.array_equal(ys[0], targets)

    ex = make_recall_example(tok, 700, 5, 4, np.random.default_rng(3))
    oracle = np.append(ex.tokens[1:], 0)  # predicts every next token
    assert recall_accuracy(oracle, ex) == 1.0
    assert recall_accuracy(np.zeros(700, dtype=np.int64), ex) == 0.0
    s, e = ex.answer_spans[2]
    broken = oracle.copy()
    broken[e - 2] = (broken[e - 2] + 1) % 256  # one wrong digit in the third answer
    assert recall_accuracy(broken, ex) == 0.75
