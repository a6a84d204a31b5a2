"""memformers.layers: the drop-in layers, their state contract, doctests and README code."""

import doctest
import re
from pathlib import Path

import pytest
import torch

import memformers
from memformers import layers
from memformers.errors import MemformersError

ROOT = Path(__file__).resolve().parents[1]


def segments(n=3, B=2, L=16, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, dim, generator=g) for _ in range(n)]


def twin(layer_cls, **kw):
    torch.manual_seed(0)
    a = layer_cls(**kw).eval()
    b = layer_cls(**kw).eval()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("cls, kw", [
    (memformers.KNNAttention, {"capacity": 64, "top_k": 4, "storage_dtype": "float32"}),
    (memformers.InfiniAttention, {}),
    (memformers.ContinuousAttention, {"n_basis": 16}),
])
def test_attention_layers_remember_reset_and_restore(cls, kw, tmp_path):
    a, b = twin(cls, dim=32, heads=4, **kw)
    s1, s2, s3 = segments()
    with torch.no_grad():
        a(s1)
        remembered = a(s2)
        fresh = b(s2)  # b never saw s1
        assert not torch.allclose(remembered, fresh, atol=1e-5)  # the memory changes it
        a.save(tmp_path / "state.safetensors")
        after = a(s3)
        b.load(tmp_path / "state.safetensors")  # b continues a's streams exactly
        assert torch.equal(b(s3), after)
        a.reset(torch.tensor([True, False]))  # stream 0 forgets, stream 1 remembers
        c = cls(dim=32, heads=4, **kw).eval()
        c.load_state_dict(a.state_dict())
        mixed, ref = a(s3), c(s3)  # c: a fresh layer
        assert torch.allclose(mixed[0], ref[0], atol=1e-6)
        assert not torch.allclose(mixed[1], ref[1], atol=1e-5)


def test_knn_attention_with_an_empty_memory_is_its_local_attention():
    a, b = twin(memformers.KNNAttention, dim=32, heads=4, capacity=64, top_k=4)
    x = segments(1)[0]
    with torch.no_grad():
        assert torch.equal(a(x), b(x, commit=False))  # nothing stored yet: the same output
        assert int(a.memory.store.count[0]) == 16 and int(b.memory.store.count[0]) == 0


def test_batch_size_change_with_state_is_refused_then_reset_allows_it():
    attn = memformers.KNNAttention(dim=32, heads=4, capacity=64, top_k=4)
    with torch.no_grad():
        attn(torch.randn(2, 8, 32))
        with pytest.raises(MemformersError, match="holds the state of 2 streams"):
            attn(torch.randn(3, 8, 32))
        attn.reset()
        assert attn(torch.randn(3, 8, 32)).shape == (3, 8, 32)


def test_new_doc_flags_reset_exactly_the_flagged_streams():
    a, b = twin(memformers.InfiniAttention, dim=32, heads=4)
    s1, s2, _ = segments()
    with torch.no_grad():
        a(s1)
        out = a(s2, new_doc=torch.tensor([True, False]))
        ref = b(s2)  # a fresh layer: what a new document sees
    assert torch.allclose(out[0], ref[0], atol=1e-6) and not torch.allclose(out[1], ref[1])


def test_knnlm_head_equals_the_model_head():
    from memformers.memory.configs import KNNLMConfig
    from memformers.memory.knnlm import KNNLM

    head = memformers.KNNLMHead(dim=8, capacity=50, top_k=4, backend="exact")
    ref = KNNLM(KNNLMConfig(capacity=50, top_k=4, backend="exact"), 8)
    ref.allocate(2, "cpu")
    torch.manual_seed(0)
    for _ in range(3):
        h, logits, tok = torch.randn(2, 10, 8), torch.randn(2, 10, 13), torch.randint(0, 13,
                                                                                    (2, 10))
        mask = torch.ones(2, 10, dtype=torch.bool)
        assert torch.equal(head(logits, h, tok), ref(logits, h, tok, mask, True))


def test_product_keys_learn():
    torch.manual_seed(0)
    ffn = memformers.ProductKeys(dim=16, n_keys=8, heads=2, k_dim=16, top_k=4)
    x, y = torch.randn(4, 8, 16), torch.randn(4, 8, 16)
    opt = torch.optim.Adam(ffn.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = (ffn(x) - y).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first


def test_bad_layer_settings_are_clear_errors():
    with pytest.raises(MemformersError, match="model.knn.top_k must be positive"):
        memformers.KNNAttention(dim=32, heads=4, top_k=0)
    with pytest.raises(MemformersError, match="does not split into 5 heads"):
        memformers.InfiniAttention(dim=32, heads=5)
    with pytest.raises(MemformersError, match="model.knnlm.lam"):
        memformers.KNNLMHead(dim=8, lam=2.0)


def test_doctests_of_the_layers():
    result = doctest.testmod(layers)
    assert result.attempted >= 5 and result.failed == 0


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("path", ["README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_documentation_code_runs(path, tmp_path, monkeypatch):
    """Every ```python block of the README and docs/ runs."""
    monkeypatch.chdir(tmp_path)
    for block in python_blocks(ROOT / path):
        exec(compile(block, f"{path} block", "exec"), {"__name__": "__doc_block__"})
