"""memformers.hf: memory retrofitted into tiny random GPT-2 / Llama-family models, offline."""

from __future__ import annotations

import copy
import json
import resource
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")  # in the test extra: CI runs these

from memformers.cli import main  # noqa: E402
from memformers.config import load_config  # noqa: E402
from memformers.data.corpus import CorpusSplit, build_corpus  # noqa: E402
from memformers.data.tokenizer import (  # noqa: E402
    PROBE_TEXT,
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    byte_tokenizer_json,
)
from memformers.errors import MemformersError  # noqa: E402
from memformers.hf import (  # noqa: E402
    add_memory,
    load_memory,
    load_pretrained,
    memorize,
    memory_layers,
    reset_memory,
    save_memory,
)
from memformers.hf.configs import tiny_config, write_model_dir  # noqa: E402
from memformers.train.trainer import Trainer  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()

KNN = {"capacity": 256, "top_k": 8, "storage_dtype": "float32"}
HF_TRAIN = ["data.segment_len=32", "data.batch_size=2", "data.eval_max_docs=3",
            "train.warmup_steps=2", "train.log_every=1", "train.lr=3e-3", "train.ckpt_every=0",
            "model.knn.layers=[1]", "model.knn.capacity=512", "model.knn.top_k=8"]


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A random 2-layer model of the family; the Llama family with grouped-query attention."""
    torch.manual_seed(seed)
    if arch in ("gpt2", "llama"):
        cfg = tiny_config(arch, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_positions=256,
                          n_kv_heads=2 if arch == "llama" else None)
    else:
        cls = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[arch]
        cfg = cls(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def retrofit(model, kind: str, gate: float = 0.0, **kw):
    options = {**KNN, **kw} if kind == "knn" else kw
    return add_memory(model, kind=kind, layers=[1], gate_init=gate, **options)


def generate(model, ids, n=6):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=0)


def counts(model) -> list[int]:
    layer = memory_layers(model)[0][1]
    if layer.kind == "knn":
        return layer.memory.store.count.tolist()
    return (~layer.empty_rows()).long().tolist()


# --------------------------------------------------------------------------- retrofit


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kind", ["knn", "infini"])
def test_retrofit_leaves_outputs_unchanged(arch, kind):
    base = tiny(arch)
    model = retrofit(copy.deepcopy(base), kind, gate=1.5)
    ids = torch.randint(0, 256, (2, 24))
    assert torch.equal(model(ids).logits, base(ids).logits)
    a, b = generate(base, ids[:, :8]), generate(model, ids[:, :8])  # with the KV cache
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))
    new = [n for n, _ in model.named_parameters() if n not in dict(base.named_parameters())]
    assert new and all(".memory." in n for n in new)  # only gates (and kNN scales) added


@pytest.mark.parametrize("kind", ["knn", "infini"])
def test_memory_is_written_only_when_memorizing_and_changes_outputs(kind):
    base = tiny("llama")
    model = retrofit(copy.deepcopy(base), kind)
    ids = torch.randint(0, 256, (2, 16))
    model(ids)
    generate(model, ids)
    assert counts(model) == [0, 0]  # plain forwards and generate never write
    doc = torch.randint(0, 256, (2, 100))
    mask = torch.ones_like(doc, dtype=torch.bool)
    mask[1, 70:] = False  # row 1 is shorter: its padding is not written
    assert memorize(model, doc, attention_mask=mask, chunk_len=32) == 100
    assert counts(model) == ([100, 70] if kind == "knn" else [1, 1])
    after = model(ids).logits
    before = base(ids).logits
    assert not torch.allclose(after[0], before[0], atol=1e-4)
    assert not torch.allclose(after[1], before[1], atol=1e-4)
    reset_memory(model, rows=[0])  # row 0 forgets, row 1 keeps its memory
    again = model(ids).logits
    assert torch.equal(again[0], before[0]) and torch.equal(again[1], after[1])
    reset_memory(model)
    assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("kind", ["knn", "infini"])
def test_memory_read_matches_brute_force(kind):
    """Layer 1's output with memory = (1 - g) original + g W_o(memory read), computed by hand
    from pre-RoPE keys/values of the memorised chunk (grouped-query attention: 4 q, 2 kv heads)."""
    base = tiny("llama")
    model = retrofit(copy.deepcopy(base), kind, gate=-0.4, capacity=64, top_k=64) \
        if kind == "knn" else retrofit(copy.deepcopy(base), kind, gate=-0.4, update="linear")
    g = torch.sigmoid(torch.tensor(-0.4))
    doc, query = torch.randint(0, 256, (1, 40)), torch.randint(0, 256, (1, 12))
    memorize(model, doc, chunk_len=40)  # one chunk: everything lands in memory

    layer = base.model.layers[1]
    captured = {}
    hook = model.model.layers[1].self_attn.register_forward_hook(
        lambda m, args, kwargs, out: captured.update(out=out[0]), with_kwargs=True)
    model(query)
    hook.remove()

    def qkv(ids):  # the layer's input (pre-norm) through its own projections, no RoPE
        h = layer.input_layernorm(base(ids, output_hidden_states=True).hidden_states[1])
        a = layer.self_attn
        return [p(h).view(1, h.shape[1], -1, 8).transpose(1, 2) for p in (a.q_proj, a.k_proj,
                                                                           a.v_proj)]

    with torch.no_grad():
        _, k_mem, v_mem = qkv(doc)  # (1, 2, 40, 8)
        q, _, _ = qkv(query)  # (1, 4, 12, 8)
        k_mem, v_mem = k_mem.repeat_interleave(2, 1), v_mem.repeat_interleave(2, 1)  # per q head
        if kind == "knn":
            scale = memory_layers(model)[0][1].memory.log_scale.exp().repeat_interleave(2)
            qn = torch.nn.functional.normalize(q, dim=-1) * scale[None, :, None, None]
            kn = torch.nn.functional.normalize(k_mem, dim=-1)
            read = torch.softmax(qn @ kn.transpose(-1, -2), -1) @ v_mem
        else:
            sq, sk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k_mem) + 1
            M, z = sk.transpose(-1, -2) @ v_mem, sk.sum(2)  # (1, 4, 8, 8), (1, 4, 8)
            read = (sq @ M) / (sq @ z[..., None])
        h = layer.input_layernorm(base(query, output_hidden_states=True).hidden_states[1])
        pos = base.model.rotary_emb(h, torch.arange(12)[None])
        original = layer.self_attn(h, position_embeddings=pos, attention_mask=None)[0]
        expected = (1 - g) * original + g * layer.self_attn.o_proj(
            read.transpose(1, 2).reshape(1, 12, 32))
    torch.testing.assert_close(captured["out"], expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_uses_memory_like_full_forwards(arch):
    model = retrofit(tiny(arch), "knn", gate=2.0)
    memorize(model, torch.randint(0, 256, (1, 90)), chunk_len=30)
    written = counts(model)
    prompt = torch.randint(0, 256, (1, 7))
    out = generate(model, prompt, n=8).sequences
    x = prompt
    for _ in range(8):  # greedy decoding without KV cache, every step a full forward
        x = torch.cat([x, model(x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, x)
    assert counts(model) == written  # generation wrote nothing
    with_memory = generate(model, prompt, n=1).logits[0]
    reset_memory(model)
    assert not torch.allclose(generate(model, prompt, n=1).logits[0], with_memory, atol=1e-4)


def test_add_memory_rejects_bad_input():
    model = tiny("gpt2")
    with pytest.raises(MemformersError, match="distinct layer indices in 0..1"):
        add_memory(copy.deepcopy(model), layers=[2])
    with pytest.raises(MemformersError, match="did you mean 'capacity'"):
        add_memory(copy.deepcopy(model), layers=[1], capacty=10)
    with pytest.raises(MemformersError, match="kind must be one of knn, infini"):
        add_memory(copy.deepcopy(model), kind="pkm", layers=[1])
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32))
    with pytest.raises(MemformersError, match="add_memory supports causal LMs of type gpt2"):
        add_memory(bert)
    retrofit(model, "knn")
    with pytest.raises(MemformersError, match="already has memory layers"):
        add_memory(model, layers=[0])
    memorize(model, torch.randint(0, 256, (2, 20)))
    with pytest.raises(MemformersError, match="holds 2 batch rows on cpu but the input has 3"):
        model(torch.randint(0, 256, (3, 5)))
    with pytest.raises(MemformersError, match="no memory layers"):
        memorize(tiny("gpt2"), torch.zeros(1, 4, dtype=torch.long))


# --------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("arch, kind", [("gpt2", "knn"), ("llama", "infini")])
def test_save_and_load_round_trip_model_and_memory(arch, kind, tmp_path):
    base = tiny(arch)
    model = retrofit(copy.deepcopy(base), kind)
    with torch.no_grad():
        for _, layer in memory_layers(model):
            layer.memory.gate.copy_(torch.randn_like(layer.memory.gate))  # "trained" gates
    memorize(model, torch.randint(0, 256, (1, 80)), chunk_len=32)
    model.save_pretrained(str(tmp_path / "model"))
    save_memory(model, tmp_path / "mem")
    ids = torch.randint(0, 256, (1, 20))

    loaded = load_pretrained(tmp_path / "model").eval()
    assert torch.equal(loaded(ids).logits, base(ids).logits)  # empty memory: the base model
    load_memory(loaded, tmp_path / "mem")
    assert counts(loaded) == counts(model)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    assert torch.equal(plain(ids).logits, base(ids).logits)  # base weights kept their names


def _mapped_file(ptr: int) -> str | None:
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[-1] if len(parts) >= 6 else None
    return None


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_a_million_token_memory_loads_memory_mapped(tmp_path):
    """2^20 (key, value) pairs per head are mapped from disk, not read: the store's buffer is
    the file mapping, resident memory barely grows, and later writes never reach the file."""
    C, part = 1 << 20, 1 << 18

    def small_gpt2():  # 2 heads of 8: the memory file holds 2 x 2^20 x 2 x 8 fp16 = 64 MiB
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(tiny_config(
            "gpt2", d_model=16, n_layers=2, n_heads=2, max_positions=64)).eval()

    model = retrofit(small_gpt2(), "knn", capacity=C, storage_dtype="float16")
    store = memory_layers(model)[0][1].memory.store
    store.allocate(1, "cpu")
    for _ in range(C // part):
        store.write(torch.randn(1, 2, part, 8), torch.randn(1, 2, part, 8),
                    torch.ones(1, part, dtype=torch.bool))
    ids = torch.randint(0, 256, (1, 8))
    expected = model(ids).logits
    out = save_memory(model, tmp_path / "mem")
    raw = (out / "memory.safetensors").read_bytes()
    del model, store

    fresh = retrofit(small_gpt2(), "knn", capacity=64)  # capacity, dtype: the saved memory's
    rss = _resident_bytes()
    load_memory(fresh, out)
    grown = _resident_bytes() - rss
    store = memory_layers(fresh)[0][1].memory.store
    assert store.capacity == C and store.count.tolist() == [C] and store.dtype == torch.float16
    assert _mapped_file(store.keys.data_ptr()) == str(out / "memory.safetensors")
    assert _mapped_file(store.values.data_ptr()) == str(out / "memory.safetensors")
    assert grown < 8 * 2**20  # a copy would add 64 MiB
    assert torch.equal(fresh(ids).logits, expected)
    memorize(fresh, torch.randint(0, 256, (1, 40)))  # writes go to private pages
    assert (out / "memory.safetensors").read_bytes() == raw


def test_load_memory_refuses_a_memory_of_other_weights(tmp_path):
    model = retrofit(tiny("llama", seed=0), "knn")
    memorize(model, torch.randint(0, 256, (1, 30)))
    save_memory(model, tmp_path / "mem")
    other = retrofit(tiny("llama", seed=1), "knn")
    with pytest.raises(MemformersError, match="made by other weights"):
        load_memory(other, tmp_path / "mem")
    load_memory(other, tmp_path / "mem", strict=False)
    with pytest.raises(MemformersError, match="holds the state of KNNMemoryAttention"):
        load_memory(retrofit(tiny("llama"), "infini"), tmp_path / "mem")
    with pytest.raises(MemformersError, match="not a saved memory"):
        load_memory(model, tmp_path)


# --------------------------------------------------------------------------- tokenizers


def test_byte_export_and_hf_tokenizer_bytes(tmp_path):
    byte = byte_tokenizer_json()  # ships with byte-vocabulary models exported to HF format
    assert byte.encode(PROBE_TEXT) == ByteTokenizer().encode(PROBE_TEXT)
    assert byte.decode(byte.encode(PROBE_TEXT)) == PROBE_TEXT and byte.token_bytes.sum() == 256
    bpe = BPETokenizer.train([PROBE_TEXT * 3, "def main():\n    return 0\n" * 5], 300)
    bpe.save(tmp_path)
    hf = HFTokenizer.load(tmp_path)  # a byte-level BPE as some model's tokenizer.json
    ids = hf.encode(PROBE_TEXT)
    assert ids == bpe.encode(PROBE_TEXT) and len(ids) < len(PROBE_TEXT.encode())
    assert hf.token_bytes[ids].sum() == len(PROBE_TEXT.encode())  # bits per byte stay exact


def test_corpus_built_with_a_models_tokenizer(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    for i in range(16):
        (text / f"d{i}.txt").write_text(f"document {i}: " + PROBE_TEXT * (i + 1))
    model_dir = write_model_dir(tmp_path / "m", tiny_config("llama", d_model=32, n_layers=2))
    assert main(["data", "build", "--source", str(text), "--tokenizer", f"hf:{model_dir}",
                 "--out", str(tmp_path / "c"), "--split", "0.4,0.3,0.3", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["tokenizer"] == {"name": "hf", "vocab_size": 256, "model": str(model_dir)}
    split = CorpusSplit.open(tmp_path / "c", "train")
    doc = split.doc(0).tolist()
    assert bytes(doc) in {(text / f"d{i}.txt").read_bytes() for i in range(16)}
    with pytest.raises(MemformersError, match="tokenizer not found"):
        build_corpus(tmp_path / "c2", str(text), tokenizer=f"hf:{tmp_path}", progress=False)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("hf") / "llama",
                           tiny_config("llama", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                       d_ff=64, max_positions=256))


@pytest.fixture(scope="module")
def pretrained(model_dir, tiny_corpus, tmp_path_factory) -> Path:
    """A model pretrained by memformers WITHOUT memory (30 steps from the random
    initialisation of ``model_dir``), exported in HF format to RUN/hf."""
    sets = [s for s in HF_TRAIN if not s.startswith("model.knn")]
    cfg = load_config(None, [*sets, f"data.corpus=\"{tiny_corpus}\"", "train.steps=30",
                             f"model.hf_path=\"{model_dir}\""])
    run = tmp_path_factory.mktemp("run") / "pre"
    Trainer(cfg, run, progress=False).run()
    return run / "hf"


@pytest.fixture(scope="module")
def finetuned(pretrained, tiny_corpus, tmp_path_factory) -> tuple[Path, dict, dict]:
    """``pretrained`` + kNN memory in layer 1, fine-tuned 20 steps: (run, eval before, after)."""
    cfg = load_config(None, [*HF_TRAIN, f"data.corpus=\"{tiny_corpus}\"", "train.steps=20",
                             f"model.hf_path=\"{pretrained}\""])
    run = tmp_path_factory.mktemp("run") / "ft"
    trainer = Trainer(cfg, run, progress=False)
    before = trainer.evaluate()  # the retrofitted model, memory on, before fine-tuning
    trainer.run()
    return run, before, trainer.evaluate()


def test_pretrained_export_is_a_plain_hf_model(pretrained):
    config = json.loads((pretrained / "config.json").read_text())
    assert "memformers" not in config and config["model_type"] == "llama"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(pretrained))
    assert HFTokenizer.load(pretrained).encode("abc") == [97, 98, 99]  # byte tokenizer
    with pytest.raises(MemformersError, match="has no memory"):
        load_pretrained(pretrained)
    assert model.config.vocab_size == 256


def test_finetune_with_memory_lowers_held_out_loss_and_exports_hf(finetuned):
    run, before, after = finetuned
    assert after["tokens"] == before["tokens"] > 0
    assert after["loss"] < before["loss"] - 0.05
    gates = [json.loads(line).get("gates") for line in (run / "metrics.jsonl").open()]
    assert gates[-1] and gates[-1] != gates[0]  # the memory gates learn
    model = load_pretrained(run / "hf")
    assert model.config.memformers["kind"] == "knn" and model.config.memformers["chunk_len"] == 32
    assert HFTokenizer.load(run / "hf").encode("abc") == [97, 98, 99]


def test_finetune_resume_continues_exactly(model_dir, tiny_corpus, tmp_path):
    sets = [*HF_TRAIN, f"data.corpus=\"{tiny_corpus}\"", f"model.hf_path=\"{model_dir}\"",
            "train.min_lr_ratio=1.0", "train.warmup_steps=0"]
    Trainer(load_config(None, [*sets, "train.steps=6"]), tmp_path / "a", progress=False).run()
    Trainer(load_config(None, [*sets, "train.steps=3"]), tmp_path / "b", progress=False).run()
    Trainer(load_config(None, [*sets, "train.steps=6"]), tmp_path / "b", resume=True,
            progress=False).run()
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(
        tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".memory.gate" in k for k in a)


def test_finetune_errors_are_one_line(capsys, model_dir, tiny_corpus, tmp_path):
    def run(model, *sets):
        args = ["finetune", "--hf-model", str(model), "--run-dir", str(tmp_path / model.name),
                "--no-progress"]
        for s in [*HF_TRAIN, f"data.corpus=\"{tiny_corpus}\"", *sets]:
            args += ["--set", s]
        code = main(args)
        return code, capsys.readouterr().err.strip()

    code, err = run(tmp_path / "nope")
    assert code == 2 and err.startswith("error: Hugging Face model directory not found")
    other = write_model_dir(tmp_path / "bpe", tiny_config("llama", vocab_size=300),
                            BPETokenizer.train([PROBE_TEXT * 4], 300))
    code, err = run(other)
    assert code == 2 and "not tokenised with the tokenizer of" in err and "\n" not in err
    code, err = run(model_dir, "model.pkm.layers=[0]")
    assert code == 2 and "model.knn or model.infini memories only" in err
    code, err = run(model_dir, "data.segment_len=512")
    assert code == 2 and "longer than the model's 256 positions" in err


def test_memorize_and_ask_cli(finetuned, tiny_corpus, tmp_path, capsys):
    run, _, _ = finetuned
    src = tmp_path / "code"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("def alpha():\n    return 'needle 4217'\n")
    (src / "b.txt").write_text("the second file\n" * 20)
    (src / "blob.bin").write_bytes(b"\x00\x01binary")
    assert main(["memorize", "--model", str(run / "hf"), "--input", str(src), "--out",
                 str(tmp_path / "mem"), "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "mem" / "memory.json").read_text())
    text = "# ==== b.txt ====\n" + "the second file\n" * 20 + \
           "# ==== pkg/a.py ====\ndef alpha():\n    return 'needle 4217'\n"
    assert manifest["tokens"] == manifest["capacity"] == len(text.encode())
    assert manifest["files"] == 2 and manifest["tokens_written"] == [len(text.encode())]
    capsys.readouterr()
    assert main(["ask", "--model", str(run / "hf"), "--memory", str(tmp_path / "mem"),
                 "--prompt", "def alpha", "--max-new-tokens", "12"]) == 0
    answer = capsys.readouterr().out
    model = load_pretrained(run / "hf").eval()  # the same answer through the API
    load_memory(model, tmp_path / "mem")
    ids = torch.tensor([list(b"def alpha")])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                         do_sample=False, pad_token_id=0)
    assert answer == HFTokenizer.load(run / "hf").decode(out[0, 9:].tolist()) + "\n"
    assert main(["ask", "--model", str(run / "hf"), "--memory", str(tmp_path),
                 "--prompt", "x"]) == 2
    assert "not a saved memory" in capsys.readouterr().err


def test_retrofit_refuses_the_joint_softmax_and_per_layer_normalisation():
    for bad in ({"combine": "joint"}, {"normalize": [1]}):
        with pytest.raises(MemformersError, match="a Hugging Face retrofit takes"):
            retrofit(tiny("gpt2"), "knn", **bad)
