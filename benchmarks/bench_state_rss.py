"""Peak RSS while streaming N tokens through a model: constant-state memories stay flat.

    python benchmarks/bench_state_rss.py --mechanism infini --lengths 8192,1048576
    python benchmarks/bench_state_rss.py --mechanism continuous --lengths 4096,16384,65536

Each length runs in a fresh process (peak RSS = ru_maxrss of that process): the demo
base (configs/demo/base.toml, weights "demo-base") with the mechanism added at its top
layer, one stream, segments of 256 tokens fed with commit=True under no_grad. The state
of Infini-attention (H x d x (d + 1) floats per layer) and of the continuous memory
(N basis coefficients per layer) does not grow with the stream, so neither should RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MECHANISMS = {"infini": "model.infini.layers=[3]", "continuous": "model.continuous.layers=[3]"}


def child(mechanism: str, length: int) -> dict:
    import torch

    from memformers.config import load_config
    from memformers.memory.state import state_bytes_per_stream
    from memformers.model import MemformerLM
    from memformers.pretrained import resolve_weights
    from memformers.train.checkpoint import load_model_weights

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/demo/base.toml", [MECHANISMS[mechanism]])
    model = MemformerLM(cfg.model).eval()
    load_model_weights(model, resolve_weights("demo-base"), strict=False)
    seg = cfg.data.segment_len
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        for s in range(length // seg):
            tokens = torch.randint(0, 256, (1, seg), generator=g)
            model(tokens, new_doc=torch.tensor([s == 0]))
    return {"mechanism": mechanism, "tokens": length, "seconds": time.perf_counter() - start,
            "state_bytes_per_stream": state_bytes_per_stream(model),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mechanism", choices=sorted(MECHANISMS), default="infini")
    ap.add_argument("--lengths", default="8192,1048576")
    ap.add_argument("--out", default="")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.mechanism, args.child)))
        return
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--mechanism", args.mechanism,
                              "--child", str(n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{args.mechanism:>10} {r['tokens']:>9,} tokens  peak RSS {r['peak_rss_mib']:7.1f} "
              f"MiB  state {r['state_bytes_per_stream']:,} B/stream  {r['seconds']:.0f} s",
              flush=True)
    first, last = rows[0]["peak_rss_mib"], rows[-1]["peak_rss_mib"]
    print(f"peak RSS {rows[-1]['tokens']:,} vs {rows[0]['tokens']:,} tokens: "
          f"{100 * (last - first) / first:+.1f}% (target < 5%)")
    out = Path(args.out or f"benchmarks/results/state_rss_{args.mechanism}.json")
    out.write_text(json.dumps({"rows": rows, "rss_change": (last - first) / first}, indent=2))


if __name__ == "__main__":
    main()
