"""memformers.hf kind="knnlm": the kNN-LM on tiny random GPT-2 / Llama models, offline,
against a brute-force reference over the memorised text's final-norm states."""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")  # in the test extra: CI runs these

from memformers.cli import main  # noqa: E402
from memformers.config import ModelConfig  # noqa: E402
from memformers.data.tokenizer import HFTokenizer, byte_tokenizer_json  # noqa: E402
from memformers.errors import MemformersError  # noqa: E402
from memformers.hf import (  # noqa: E402
    add_memory,
    knnlm_of,
    load_memory,
    load_pretrained,
    memorize,
    memory_layers,
    reset_memory,
    save_memory,
    writing,
)
from memformers.hf.configs import tiny_config  # noqa: E402
from memformers.hf.lm import HFMemoryLM  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()

KNNLM = {"capacity": 256, "top_k": 4, "temperature": 0.1, "lam": 0.3, "backend": "exact",
         "storage_dtype": "float32"}


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(
        arch, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_positions=256,
        n_kv_heads=2 if arch == "llama" else None)).eval()


def with_knnlm(base, **kw):
    return add_memory(copy.deepcopy(base), kind="knnlm", **{**KNNLM, **kw})


@torch.no_grad()
def final_norm_states(base, ids: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """(T, D): the base model's final-norm output of each position, chunk by chunk."""
    return torch.cat([base.base_model(ids[:, s:s + chunk_len]).last_hidden_state[0]
                      for s in range(0, ids.shape[1], chunk_len)])


@torch.no_grad()
def reference(base, doc: torch.Tensor, query: torch.Tensor, chunk_len: int, first: int = 0,
              top_k=4, temperature=0.1, lam=0.3) -> torch.Tensor:
    """log((1 - lam) p_LM + lam p_kNN) (L, V) of ``query`` (1, L), p_kNN by brute force over
    the stored pairs (h_p, x_{p+1}), p = first .. T-2, of ``doc`` (1, T), cosine top-k."""
    keys = final_norm_states(base, doc, chunk_len)[first:-1]
    values = doc[0, first + 1:]
    h = base.base_model(query).last_hidden_state[0]
    sim = torch.nn.functional.normalize(h, dim=-1) @ torch.nn.functional.normalize(
        keys, dim=-1).T  # (L, N)
    s, i = sim.topk(min(top_k, len(values)), dim=-1)
    w = torch.softmax(s / temperature, dim=-1)
    logits = base(query).logits[0]
    p_knn = torch.zeros_like(logits).scatter_add_(1, values[i], w)
    return torch.log((1 - lam) * torch.softmax(logits, -1) + lam * p_knn)


def generate(model, ids, n=8):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_knnlm_changes_nothing_with_lam_0_or_an_empty_datastore(arch):
    base = tiny(arch)
    ids = torch.randint(0, 256, (2, 20))
    model = with_knnlm(base)
    assert torch.equal(model(ids).logits, base(ids).logits)  # empty datastore
    assert torch.equal(generate(model, ids[:, :6]).sequences, generate(base, ids[:, :6]).sequences)
    off = with_knnlm(base, lam=0.0)
    memorize(off, torch.randint(0, 256, (2, 50)), chunk_len=16)
    assert knnlm_of(off).count.tolist() == [49, 49]
    assert torch.equal(off(ids).logits, base(ids).logits)
    assert memory_layers(model) == []  # no layer changed ...
    assert model.state_dict().keys() == base.state_dict().keys()  # ... and no weight added


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_knnlm_log_probs_match_brute_force(arch):
    base = tiny(arch)
    model = with_knnlm(base)
    doc = torch.randint(0, 256, (1, 70))
    memorize(model, doc, chunk_len=32)  # 3 chunks: pairs across boundaries via the pending key
    knnlm = knnlm_of(model)
    assert knnlm.count.tolist() == [69] and bool(knnlm.pending[0])
    query = torch.randint(0, 256, (1, 12))
    torch.testing.assert_close(model(query).logits[0], reference(base, doc, query, 32),
                               atol=1e-5, rtol=1e-5)
    # the memorised text itself: position t finds its own pair (cosine 1) except the last,
    # whose key is pending (no next token yet): it is never retrieved
    part = doc[:, 64:]  # the last chunk, at the positions it was memorised at
    torch.testing.assert_close(model(part).logits[0], reference(base, doc, part, 32),
                               atol=1e-5, rtol=1e-5)


def test_adaptive_retrieval_keeps_p_lm_where_the_model_is_sure():
    base = tiny("gpt2")
    doc, query = torch.randint(0, 256, (1, 70)), torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        p_max = torch.softmax(base(query).logits[0], -1).max(-1).values
    v = p_max.flatten().sort().values
    t = float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2  # halfway: no position on the edge
    model = with_knnlm(base, retrieve_below=t)
    memorize(model, doc, chunk_len=32)
    got, full = model(query).logits[0], reference(base, doc, query, 32)
    sure = p_max >= t
    assert 0 < int(sure.sum()) < len(sure)
    torch.testing.assert_close(got[~sure], full[~sure], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[sure], torch.log_softmax(base(query).logits[0][sure], -1))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_with_knnlm_equals_full_forwards(arch):
    base = tiny(arch)
    model = with_knnlm(base, lam=0.8, temperature=0.05)
    memorize(model, torch.randint(0, 256, (1, 90)), chunk_len=30)
    written = knnlm_of(model).count.tolist()
    prompt = torch.randint(0, 256, (1, 7))
    out = generate(model, prompt)
    x = prompt
    for _ in range(8):  # greedy without KV cache: argmax of the mixed log-probs, full forwards
        x = torch.cat([x, model(x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.sequences, x)
    assert knnlm_of(model).count.tolist() == written  # generation wrote nothing
    assert not torch.allclose(out.logits[0].float(), generate(base, prompt, 1).logits[0],
                              atol=1e-3)


def test_fifo_keeps_only_the_last_capacity_pairs():
    base = tiny("llama")
    model = with_knnlm(base, capacity=20)
    doc = torch.randint(0, 256, (1, 60))
    memorize(model, doc, chunk_len=16)
    assert knnlm_of(model).count.tolist() == [59] and knnlm_of(model).filled.tolist() == [20]
    query = torch.randint(0, 256, (1, 10))
    torch.testing.assert_close(model(query).logits[0],
                               reference(base, doc, query, 16, first=59 - 20),
                               atol=1e-5, rtol=1e-5)


def test_reset_rows_and_padding():
    base = tiny("gpt2")
    model = with_knnlm(base)
    doc = torch.randint(0, 256, (2, 50))
    mask = torch.ones_like(doc, dtype=torch.bool)
    mask[1, 30:] = False  # row 1 is shorter: its padding is not written
    memorize(model, doc, attention_mask=mask, chunk_len=16)
    assert knnlm_of(model).count.tolist() == [49, 29]
    ids = torch.randint(0, 256, (2, 9))
    after, before = model(ids).logits, base(ids).logits
    torch.testing.assert_close(after[1], reference(base, doc[1:, :30], ids[1:], 16),
                               atol=1e-5, rtol=1e-5)
    twin = copy.deepcopy(model)  # hooks its own copy of the datastore
    reset_memory(model, rows=[0])
    again = model(ids).logits
    assert torch.equal(again[0], before[0]) and torch.equal(again[1], after[1])
    reset_memory(model)
    assert knnlm_of(model).count.numel() == 0
    assert torch.equal(model(ids).logits, before)
    assert torch.equal(twin(ids).logits, after)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_knnlm_save_and_load_round_trip(arch, tmp_path):
    base = tiny(arch)
    model = with_knnlm(base)
    memorize(model, torch.randint(0, 256, (1, 80)), chunk_len=32)
    model.save_pretrained(str(tmp_path / "model"))
    manifest_dir = save_memory(model, tmp_path / "mem")
    manifest = json.loads((manifest_dir / "memory.json").read_text())
    assert manifest["modules"] == {"knnlm": "HFKNNLM"} and manifest["tokens_written"] == [80]
    ids = torch.randint(0, 256, (1, 15))
    expected = model(ids).logits

    loaded = load_pretrained(tmp_path / "model").eval()
    assert knnlm_of(loaded).cfg == knnlm_of(model).cfg
    assert loaded.config.memformers == model.config.memformers
    assert torch.equal(loaded(ids).logits, base(ids).logits)  # empty datastore: the base
    load_memory(loaded, tmp_path / "mem")
    assert torch.equal(loaded(ids).logits, expected)
    small = with_knnlm(base, capacity=8)  # adopts the saved capacity
    load_memory(small, tmp_path / "mem")
    assert knnlm_of(small).cfg.capacity == 256 and torch.equal(small(ids).logits, expected)
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    assert torch.equal(plain(ids).logits, base(ids).logits)  # base weights kept their names
    with pytest.raises(MemformersError, match="nothing to train"):
        HFMemoryLM.from_model_config(ModelConfig(hf_path=str(tmp_path / "model")))


def test_knnlm_rejects_bad_input():
    model = tiny("gpt2")
    with pytest.raises(MemformersError, match="unknown knnlm memory option 'capacty'"):
        add_memory(copy.deepcopy(model), kind="knnlm", capacty=10)
    with pytest.raises(MemformersError, match="key must be 'final_norm'"):
        add_memory(copy.deepcopy(model), kind="knnlm", key="ffn_input")
    with pytest.raises(MemformersError, match="leave out layers"):
        add_memory(copy.deepcopy(model), kind="knnlm", layers=[1])
    with pytest.raises(MemformersError, match="capacity must be > 0"):
        add_memory(copy.deepcopy(model), kind="knnlm", capacity=0)
    with pytest.raises(MemformersError, match="lam must be in"):
        add_memory(copy.deepcopy(model), kind="knnlm", lam=1.5)
    add_memory(model, kind="knnlm", capacity=64)
    ids = torch.randint(0, 256, (2, 10))
    with pytest.raises(MemformersError, match="needs the input ids"), writing(model):
        model(ids)
    memorize(model, ids)
    with pytest.raises(MemformersError, match="holds 2 batch rows on cpu but the input has 3"):
        model(torch.randint(0, 256, (3, 5)))


def test_memorize_and_ask_cli_with_knnlm(tmp_path, capsys):
    model = with_knnlm(tiny("gpt2"), lam=0.5, capacity=16)
    model.save_pretrained(str(tmp_path / "model"))
    byte_tokenizer_json().save(tmp_path / "model")
    text = "def alpha():\n    return 'needle 4217'\n" * 8  # 2 chunks of 256
    (tmp_path / "a.py").write_text(text)
    assert main(["memorize", "--model", str(tmp_path / "model"), "--input",
                 str(tmp_path / "a.py"), "--out", str(tmp_path / "mem"), "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "mem" / "memory.json").read_text())
    assert manifest["capacity"] == len(text) - 1 and manifest["tokens_written"] == [len(text)]
    capsys.readouterr()
    assert main(["ask", "--model", str(tmp_path / "model"), "--memory", str(tmp_path / "mem"),
                 "--prompt", "def alpha", "--max-new-tokens", "12"]) == 0
    answer = capsys.readouterr().out
    loaded = load_pretrained(tmp_path / "model").eval()  # the same answer through the API
    load_memory(loaded, tmp_path / "mem")
    assert knnlm_of(loaded).count.tolist() == [len(text) - 1]
    ids = torch.tensor([list(b"def alpha")])
    out = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                          do_sample=False, pad_token_id=0)
    assert answer == HFTokenizer.load(tmp_path / "model").decode(out[0, 9:].tolist()) + "\n"
