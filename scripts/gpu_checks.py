"""GPU correctness checks (run on a CUDA machine): SDPA with our masks vs the math
reference, every mechanism forward/backward under bf16 autocast vs fp32, and the
kNN exact search on CUDA vs a brute-force scan.

    PYTHONPATH=src python scripts/gpu_checks.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memformers.config import ModelConfig
from memformers.memory.configs import ContinuousConfig, InfiniConfig, KNNConfig, PKMConfig
from memformers.memory.knn_store import exact_topk
from memformers.model import MemformerLM, lm_loss


def check_sdpa_masks(dev: str) -> None:
    torch.manual_seed(0)
    B, H, L, C, d = 4, 8, 256, 256, 32
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(B, H, L, d, device=dev, dtype=dtype) for _ in range(3))
        kk, vv = torch.cat([torch.randn_like(k), k], 2), torch.cat([torch.randn_like(v), v], 2)
        bias = torch.randn(1, H, L, C + L, device=dev, dtype=dtype)
        causal = torch.ones(L, C + L, dtype=torch.bool, device=dev).tril(diagonal=C)
        mask = bias.masked_fill(~causal, float("-inf"))
        got = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        s = (q.float() @ kk.float().transpose(-1, -2)) / d ** 0.5 + mask.float()
        ref = torch.softmax(s, -1) @ vv.float()
        err = (got.float() - ref).abs().max().item()
        print(f"sdpa {dtype}: max abs err vs math {err:.2e}")
        assert err < (1e-4 if dtype == torch.float32 else 5e-2)


def check_models(dev: str) -> None:
    variants = {
        "xl": {}, "knn": {"knn": KNNConfig(layers=[2], capacity=1024)},
        "infini": {"infini": InfiniConfig(layers=[1, 2])},
        "continuous": {"continuous": ContinuousConfig(layers=[2], n_basis=64, n_samples=64)},
        "pkm": {"pkm": PKMConfig(layers=[1], n_keys=64, k_dim=64, top_k=8)},
    }
    for name, kw in variants.items():
        losses = {}
        for prec in ("fp32", "bf16"):
            torch.manual_seed(0)
            m = MemformerLM(ModelConfig(n_layers=4, d_model=128, n_heads=4, head_dim=32,
                                        d_ff=512, xl_cache=True, **kw)).to(dev)
            gen = torch.Generator().manual_seed(1)
            tot = 0.0
            for _ in range(4):
                x = torch.randint(0, 256, (4, 129), generator=gen).to(dev)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=prec == "bf16"):
                    loss = lm_loss(m(x[:, :-1]), x[:, 1:])
                loss.backward()
                m.detach_state()
                tot += loss.item()
            grads_ok = all(torch.isfinite(p.grad).all() for p in m.parameters()
                           if p.grad is not None)
            losses[prec] = tot / 4
            assert grads_ok, name
        rel = abs(losses["bf16"] - losses["fp32"]) / losses["fp32"]
        print(f"{name}: loss fp32 {losses['fp32']:.4f} bf16 {losses['bf16']:.4f} rel {rel:.1e}")
        assert rel < 2e-2


def check_knn_search(dev: str) -> None:
    torch.manual_seed(0)
    keys = F.normalize(torch.randn(16, 65536, 32, device=dev), dim=-1).half()
    q = F.normalize(torch.randn(16, 512, 32, device=dev), dim=-1)
    count = torch.full((16,), 65536, device=dev)
    s, i = exact_topk(keys, count, q, 32)
    ref_s, _ = (q @ keys.float().transpose(1, 2)).topk(32, dim=-1)
    err = (s - ref_s).abs().max().item()
    print(f"knn exact top-32 over 65K on CUDA: max score err {err:.2e}")
    assert err < 1e-4
    # bf16 scores on the tensor cores, candidates re-ranked in fp32 (model.knn.search_dtype)
    sb, ib = exact_topk(keys, count, q, 32, score_dtype=torch.bfloat16)
    recall = (ib[..., :, None] == i[..., None, :]).any(-1).float().mean().item()
    print(f"knn bf16-scored top-32: recall {recall:.4f} against fp32 (random keys)")
    assert recall > 0.95
    times = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        exact_topk(keys, count, q, 32, score_dtype=dt)  # warm-up
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            exact_topk(keys, count, q, 32, score_dtype=dt)
        end.record()
        torch.cuda.synchronize()
        times[name] = start.elapsed_time(end) / 5
    print(f"knn exact search, 16 memories x 65,536 rows x 512 queries: fp32 "
          f"{times['fp32']:.1f} ms, bf16 {times['bf16']:.1f} ms per segment")


if __name__ == "__main__":
    dev = "cuda"
    print(torch.__version__, torch.cuda.get_device_name())
    check_sdpa_masks(dev)
    check_knn_search(dev)
    check_models(dev)
    print("all GPU checks passed")
