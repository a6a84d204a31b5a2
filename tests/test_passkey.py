import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from memformers.config import ModelConfig
from memformers.data.tokenizer import ByteTokenizer
from memformers.errors import MemformersError
from memformers.evaluate.generate import feed_and_generate, sample_next
from memformers.evaluate.passkey import (
    evaluate_passkey,
    passkey_table,
    plot_passkey_file,
    plot_passkey_heatmap,
)
from memformers.memory.state import collect_state_tensors
from memformers.model import MemformerLM
from memformers.tasks.passkey import (
    FILLER_SENTENCES,
    NEEDLE,
    PREFIX,
    QUESTION,
    make_passkey_example,
    passkey_training_batch,
    passkey_training_example,
)


class PairTokenizer:
    """Two characters per token: token boundaries differ from the byte tokenizer's."""

    vocab_size = 65536

    def encode(self, text: str) -> list[int]:
        b = text.encode("latin-1")  # ASCII here: a lone last byte gets its own id range
        return [b[i] * 256 + b[i + 1] if i + 1 < len(b) else 65535 - b[i]
                for i in range(0, len(b), 2)]

    def decode(self, ids) -> str:
        out = bytearray()
        for t in ids:
            t = int(t)
            if t > 65535 - 256:
                out.append(65535 - t)
            else:
                out += bytes([t // 256, t % 256])
        return out.decode("latin-1")


TOKENIZERS = [ByteTokenizer(), PairTokenizer()]
FILLER = "".join(FILLER_SENTENCES)


def test_pair_tokenizer_round_trips():
    tok = PairTokenizer()
    for text in ["ab", "abc", "The pass key is 12345. ", "x"]:
        assert tok.decode(tok.encode(text)) == text


# ------------------------------------------------------------------ the prompt


@pytest.mark.parametrize("tok", TOKENIZERS, ids=["byte", "pair"])
@pytest.mark.parametrize("length", [260, 333, 1000, 2049])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_prompt_exact_length_single_needle_at_depth(tok, length, depth):
    ex = make_passkey_example(tok, length, depth, np.random.default_rng(0))
    assert ex.tokens.dtype == np.int64 and ex.tokens.shape == (length,)
    assert len(ex.key) == 5 and ex.key.isdigit() and ex.key[0] != "0"
    text = tok.decode(ex.tokens)
    needle = NEEDLE.format(key=ex.key)
    assert text.startswith(PREFIX) and text.endswith(QUESTION)
    assert text.count(needle) == 1 and text.count(ex.key) == 2  # only inside the needle
    assert re.sub(r"\d", "", text.replace(needle, "")) == text.replace(needle, "")
    # the needle's ids sit at needle_start
    n_ids = np.asarray(tok.encode(needle))
    assert np.array_equal(ex.tokens[ex.needle_start:ex.needle_start + len(n_ids)], n_ids)
    # everything else is prefix + (repeated filler, cut) + question
    rest = text.replace(needle, "")
    filler = rest[len(PREFIX):len(rest) - len(QUESTION)]
    assert (FILLER * (len(filler) // len(FILLER) + 1)).startswith(filler)
    # depth: within one filler sentence of the requested fraction of the filler
    n_prefix = len(tok.encode(PREFIX))
    n_filler = length - n_prefix - len(n_ids) - len(tok.encode(QUESTION))
    longest = max(len(tok.encode(s)) for s in FILLER_SENTENCES)
    assert abs(ex.needle_start - n_prefix - depth * n_filler) <= longest
    assert np.array_equal(ex.answer, tok.encode(" " + ex.key))


def test_depth_extremes_and_order():
    tok = ByteTokenizer()
    starts = [make_passkey_example(tok, 1500, d, np.random.default_rng(1)).needle_start
              for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert starts == sorted(starts) and len(set(starts)) == 5
    assert starts[0] == len(PREFIX)  # right after the prefix
    assert starts[-1] == 1500 - len(QUESTION) - len(NEEDLE.format(key="12345"))  # before question


def test_seeds_give_different_keys_and_same_seed_same_key():
    tok = ByteTokenizer()
    keys = [make_passkey_example(tok, 300, 0.5, np.random.default_rng(s)).key for s in range(20)]
    assert len(set(keys)) >= 18
    again = [make_passkey_example(tok, 300, 0.5, np.random.default_rng(s)).key for s in range(20)]
    assert keys == again


def test_digits_configurable_and_errors():
    tok = ByteTokenizer()
    ex = make_passkey_example(tok, 400, 0.3, np.random.default_rng(0), digits=9)
    assert len(ex.key) == 9 and len(ex.answer) == 10
    with pytest.raises(MemformersError):
        make_passkey_example(tok, 100, 0.5, np.random.default_rng(0))
    with pytest.raises(MemformersError):
        make_passkey_example(tok, 400, 1.5, np.random.default_rng(0))


@pytest.mark.parametrize("tok", TOKENIZERS, ids=["byte", "pair"])
def test_training_example_targets_only_on_answer(tok):
    length = 517
    tokens, targets = passkey_training_example(tok, length, 0.4, np.random.default_rng(3))
    assert tokens.shape == targets.shape == (length,)
    on = np.flatnonzero(targets != -100)
    answer = targets[on]
    key = tok.decode(answer).strip()
    assert key.isdigit() and len(key) == 5
    assert np.array_equal(answer, tok.encode(" " + key))
    assert np.array_equal(on, np.arange(length - len(answer), length))  # the last A positions
    assert np.array_equal(targets[on[:-1]], tokens[on[1:]])  # next-token alignment
    full = tok.decode(np.concatenate([tokens, answer[-1:]]))
    assert full.endswith(QUESTION + " " + key)
    assert full.count(NEEDLE.format(key=key)) == 1
    xs, ys = passkey_training_batch(tok, 3, length, np.random.default_rng(0))
    assert xs.shape == ys.shape == (3, length)


# ------------------------------------------------------------------ generation


def tiny_model(**kw) -> MemformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, head_dim=8, d_ff=64, vocab_size=256,
                      xl_cache=True, **kw)
    model = MemformerLM(cfg)
    torch.nn.init.normal_(model.rel_bias.emb.weight)  # positions matter
    torch.nn.init.normal_(model.embed.weight)  # sharper logits: no argmax near-ties
    return model.eval()


@torch.no_grad()
def reference_greedy(model, prompt, n_new, segment_len):
    """Recompute the whole sequence from a fresh state at every step."""
    seq = prompt
    for _ in range(n_new):
        model.allocate_state(seq.shape[0])
        for s in range(0, seq.shape[1], segment_len):
            last = model(seq[:, s:s + segment_len])[:, -1]
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], 1)
    return seq[:, prompt.shape[1]:]


def test_greedy_matches_full_recompute_within_one_segment():
    model = tiny_model()
    prompt = torch.randint(0, 256, (3, 10))
    got = feed_and_generate(model, prompt, 6, segment_len=16)
    want = []
    with torch.no_grad():
        seq = prompt
        for _ in range(6):
            model.allocate_state(3)
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)  # one pass over everything
            seq = torch.cat([seq, nxt], 1)
    want = seq[:, 10:]
    assert got.shape == (3, 6) and torch.equal(got, want)


@pytest.mark.parametrize("prompt_len,n_new", [(37, 12), (16, 9), (5, 20)])
def test_greedy_matches_segmentwise_recompute_across_segments(prompt_len, n_new):
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, prompt_len))
    got = feed_and_generate(model, prompt, n_new, segment_len=8)
    assert torch.equal(got, reference_greedy(model, prompt, n_new, 8))


@pytest.mark.parametrize("prompt_len,n_new", [(21, 4), (21, 3), (24, 1), (3, 2)])
def test_state_holds_exactly_the_full_segments_fed(prompt_len, n_new):
    """Only full segments are committed: state == fresh feed of those segments."""
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, prompt_len))
    gen = feed_and_generate(model, prompt, n_new, segment_len=8)
    after = collect_state_tensors(model)
    run = torch.cat([prompt, gen[:, :-1]], 1)  # the last token is never fed
    n_commit = run.shape[1] // 8
    with torch.no_grad():
        model.allocate_state(2)
        for s in range(n_commit):
            model(run[:, 8 * s:8 * (s + 1)])
    want = collect_state_tensors(model)
    assert after.keys() == want.keys()
    if n_commit:
        assert len(want) > 0
    for k in want:
        assert torch.equal(after[k], want[k]), k


def test_continue_stream_without_new_doc():
    model = tiny_model()
    tokens = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        model.allocate_state(1)
        model(tokens[:, :8])
    cont = feed_and_generate(model, tokens[:, 8:], 5, segment_len=8, new_doc=False)
    full = feed_and_generate(model, tokens, 5, segment_len=8)
    assert torch.equal(cont, full)


def test_sampling():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1), logits.argmax(-1))
    top3 = logits.topk(3, -1).indices
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.repeat_interleave(200, 0), temperature=2.0, top_k=3,
                        generator=g).view(4, 200)
    assert all(set(draws[b].tolist()) <= set(top3[b].tolist()) for b in range(4))
    assert all(len(set(draws[b].tolist())) > 1 for b in range(4))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, 11))
    a = feed_and_generate(model, prompt, 7, 8, temperature=1.0, generator=g1)
    b = feed_and_generate(model, prompt, 7, 8, temperature=1.0, generator=g2)
    assert torch.equal(a, b)


# ------------------------------------------------------------------ the evaluator


class OracleLM(nn.Module):
    """Reads the pass key from what it can see and answers it.

    It sees the tokens of its last ``window`` committed segments (all if None) plus the
    current call, so it checks the streaming protocol: committed segments must be
    exactly ``segment_len`` long, a new document must clear the stream, and
    uncommitted calls must leave no trace (else the text after the question is not
    a prefix of the answer and it answers garbage).
    """

    def __init__(self, tokenizer, segment_len, window=None, garbage=False):
        super().__init__()
        self.tok, self.segment_len = tokenizer, segment_len
        self.window, self.garbage = window, garbage
        self.dummy = nn.Parameter(torch.zeros(1))
        self.committed_lengths: list[int] = []

    def allocate_state(self, batch_size, device=None):
        self.history = [[] for _ in range(batch_size)]  # per stream: list of segments

    def _predict(self, seq: list[int]) -> int:
        if self.garbage:
            return ord("x")
        text = self.tok.decode(seq)
        m = re.search(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.", text)
        q = text.rfind(QUESTION)
        if m is None or q < 0:
            return 0
        answer, after = " " + m.group(1), text[q + len(QUESTION):]
        if not answer.startswith(after) or after == answer:
            return 0
        return ord(answer[len(after)])

    def forward(self, tokens, *, new_doc=None, mask=None, commit=True):
        B, L = tokens.shape
        logits = torch.zeros(B, L, 256)
        for b in range(B):
            if new_doc is not None and bool(new_doc[b]):
                self.history[b] = []
            segs = self.history[b] if self.window is None else self.history[b][-self.window:]
            seen = [t for s in segs for t in s] + tokens[b].tolist()
            logits[b, :, self._predict(seen)] = 1.0  # every position: the last one's guess
            if commit:
                self.history[b].append(tokens[b].tolist())
        if commit:
            self.committed_lengths.append(L)
        return logits


def test_oracle_scores_one_and_garbage_scores_zero():
    tok = ByteTokenizer()
    kw = dict(lengths=[300, 450], depths=[0.0, 0.5, 1.0], segment_len=64, samples_per_cell=3,
              progress=False)
    oracle = OracleLM(tok, 64)
    res = evaluate_passkey(oracle, tok, **kw)
    assert res["accuracy"] == [[1.0] * 3] * 2
    assert set(oracle.committed_lengths) == {64}
    garbage = evaluate_passkey(OracleLM(tok, 64, garbage=True), tok, **kw)
    assert garbage["accuracy"] == [[0.0] * 3] * 2


def test_depth_axis_with_a_short_sighted_oracle():
    """An oracle seeing one past segment finds the needle only near the end."""
    tok = ByteTokenizer()
    res = evaluate_passkey(OracleLM(tok, 64, window=1), tok, [1200], [0.0, 0.5, 1.0],
                           segment_len=64, samples_per_cell=2, progress=False)
    assert res["accuracy"] == [[0.0, 0.0, 1.0]]


def test_evaluate_passkey_tiny_model(tmp_path):
    model = tiny_model()
    model.train()
    tok = ByteTokenizer()
    # stream state from "training" must survive the evaluation
    with torch.no_grad():
        model.allocate_state(3)
        model(torch.randint(0, 256, (3, 16)))
    before = collect_state_tensors(model)
    res = evaluate_passkey(model, tok, [260, 300], [0.0, 0.5, 1.0], segment_len=128,
                           samples_per_cell=2, progress=False)
    assert model.training
    after = collect_state_tensors(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert res["lengths"] == [260, 300] and res["depths"] == [0.0, 0.5, 1.0]
    acc = np.asarray(res["accuracy"])
    assert acc.shape == (2, 3) and ((acc >= 0) & (acc <= 1)).all()
    assert res["seconds_per_sample"] > 0
    assert np.asarray(res["seconds_per_sample_grid"]).shape == (2, 3)
    table = passkey_table(res)
    assert table.count("\n") == 3 and "| 260 |" in table and "depth 0.50" in table
    png = plot_passkey_heatmap(res, tmp_path / "sub" / "passkey.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap_from_a_stored_passkey_json(tmp_path):
    res = {"lengths": [4096, 16384], "depths": [0.1, 0.9], "accuracy": [[1.0, 0.5], [0.0, 1.0]]}
    script = tmp_path / "finetune.json"  # a result held under "passkey"
    script.write_text(json.dumps({"train_log": [], "passkey": res}))
    png = plot_passkey_file(script)
    assert png == tmp_path / "finetune.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bare = tmp_path / "bare.json"  # evaluate_passkey's result itself
    bare.write_text(json.dumps(res))
    assert plot_passkey_file(bare, tmp_path / "x.png").stat().st_size > 1000
    bare.write_text(json.dumps({"train_log": []}))
    with pytest.raises(MemformersError, match="holds no passkey result"):
        plot_passkey_file(bare)


def test_passkey_table_values():
    res = {"lengths": [1000, 2000], "depths": [0.0, 1.0], "accuracy": [[1.0, 0.5], [0.0, 0.25]]}
    lines = passkey_table(res).splitlines()
    assert lines[2] == "| 1000 | 100% | 50% | 75% |"
    assert lines[3] == "| 2000 | 0% | 25% | 12% |"
