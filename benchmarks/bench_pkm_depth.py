"""Inference speed of depth D + product-key memory vs a dense model of depth 2D.

    python benchmarks/bench_pkm_depth.py                 # d_model 128, 256, 384, 512; ~4 min
    python benchmarks/bench_pkm_depth.py --widths 256 --device cuda

Lample et al.'s trade-off: 12 layers + memory beat 24 dense layers and ran almost
twice as fast. Whether the memory is cheap depends on the width: its lookup costs
about heads x n_keys x k_dim multiply-adds per token (4 x 512 x 256 = 0.5M for the
issue's defaults) plus a top-k, while a dense block costs ~12 d_model^2 + attention.
For each width this times the forward pass (no_grad, eval mode, XL cache, 4 streams
x 256 tokens, random weights: speed does not depend on training) of
  * dense-2D: 2D layers, FFN everywhere,
  * D+pkm: D layers, the FFN of layer D // 2 replaced by a 262,144-slot memory,
repeats interleaved so load hits both alike; medians of the same run. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from memformers.config import ModelConfig
from memformers.memory.configs import PKMConfig
from memformers.model import MemformerLM


def build(width: int, layers: int, pkm_layer: int | None, device: str) -> MemformerLM:
    pkm = PKMConfig(layers=[pkm_layer] if pkm_layer is not None else [], n_keys=512,
                    heads=4, k_dim=256, top_k=32)
    cfg = ModelConfig(n_layers=layers, d_model=width, n_heads=width // 32, head_dim=32,
                      d_ff=4 * width, vocab_size=256, xl_cache=True, pkm=pkm)
    torch.manual_seed(0)
    return MemformerLM(cfg).to(device).eval()


@torch.no_grad()
def forward_seconds(model: MemformerLM, tokens: torch.Tensor, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    model(tokens, new_doc=torch.zeros(tokens.shape[0], dtype=torch.bool, device=device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default="128,256,384,512")
    ap.add_argument("--depth", type=int, default=3, help="D (the dense model has 2D layers)")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--segment", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--out", default="benchmarks/results/pkm_depth.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    D, rows = args.depth, []
    tokens = torch.randint(0, 256, (args.streams, args.segment), device=args.device)
    for width in [int(w) for w in args.widths.split(",")]:
        models = {f"dense-{2 * D}L": build(width, 2 * D, None, args.device),
                  f"{D}L+pkm": build(width, D, D // 2, args.device)}
        for m in models.values():  # warm-up; also fills the XL caches
            m.allocate_state(args.streams, args.device)
            forward_seconds(m, tokens, args.device)
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.repeats):
            for name, m in models.items():
                times[name].append(forward_seconds(m, tokens, args.device))
        med = {k: statistics.median(v) for k, v in times.items()}
        dense, pkm = med[f"dense-{2 * D}L"], med[f"{D}L+pkm"]
        n_tok = tokens.numel()
        rows.append({"d_model": width, "dense_tok_s": n_tok / dense, "pkm_tok_s": n_tok / pkm,
                     "speedup": dense / pkm,
                     "dense_params": models[f"dense-{2 * D}L"].num_parameters(),
                     "pkm_params": models[f"{D}L+pkm"].num_parameters()})
    print(f"forward, {args.streams} streams x {args.segment} tokens, device {args.device}, "
          f"threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'d_model':>8}{'dense-' + str(2 * D) + 'L tok/s':>18}{str(D) + 'L+pkm tok/s':>16}"
          f"{'speed-up':>10}")
    for r in rows:
        print(f"{r['d_model']:>8}{r['dense_tok_s']:>18,.0f}{r['pkm_tok_s']:>16,.0f}"
              f"{r['speedup']:>10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "setup": {
        "depth": D, "streams": args.streams, "segment": args.segment, "repeats": args.repeats,
        "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.machine(), "pkm": "512^2 slots, 4 heads, k_dim 256, top-32"}},
        indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
