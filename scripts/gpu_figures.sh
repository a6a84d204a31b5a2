#!/usr/bin/env bash
# The GPU figures quoted in the README (one H100, bf16 autocast):
#   1. baseline vs Transformer-XL from scratch at equal steps (issue: XL beats baseline)
#   2. kNN memory fine-tuned from the shipped base on long documents + passkey documents
#      (<= 4K tokens), then passkey retrieval at 4K..64K tokens of context
#   3. training throughput of the benchmark presets
# Usage: bash scripts/gpu_figures.sh OUT_DIR
set -euo pipefail
out=${1:?output dir}
mkdir -p "$out"
python -m memformers data build --out data/stdlib-byte --quiet >/dev/null 2>&1 || true
for preset in baseline xl; do
    python -m memformers train --config configs/$preset.toml --run-dir "$out/$preset" \
        --no-progress --set train.steps=1500 --set data.batch_size=16 --set train.ckpt_every=0 \
        --set data.eval_max_docs=0 --set data.eval_max_tokens=300000 | tail -6
done
python -m memformers data passkey --out data/passkey-4k --docs 3000 --min-length 512 \
    --max-length 4096 --overwrite >/dev/null
python -m memformers train --config configs/demo/base.toml --run-dir "$out/knn-passkey" \
    --no-progress --set train.init_from=demo-base --set model.knn.capacity=65536 \
    --set "data.mix=['data/passkey-4k']" --set train.steps=800 --set train.lr=1e-3 \
    --set train.warmup_steps=50 --set train.ckpt_every=0 --set data.eval_max_tokens=100000 | tail -6
python - "$out" <<'PY'
import json, sys
from pathlib import Path
import torch
from memformers.cli import load_trained_model
from memformers.evaluate.passkey import evaluate_passkey, passkey_table
out = Path(sys.argv[1])
cfg, model, tok = load_trained_model(out / "knn-passkey", [], "cuda")
res = {}
for name, cap in (("memory_on", 65536), ("memory_off", 0)):
    _, model, tok = load_trained_model(out / "knn-passkey", [f"model.knn.capacity={cap}"], "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        r = evaluate_passkey(model, tok, [4096, 16384, 65536], [0.1, 0.5, 0.9],
                             segment_len=cfg.data.segment_len, samples_per_cell=8, device="cuda",
                             progress=False)
    res[name] = r
    print(name); print(passkey_table(r), flush=True)
(out / "passkey.json").write_text(json.dumps(res, indent=2))
PY
python benchmarks/bench_lm.py --device cuda --presets baseline,xl,xl+knn65k --steps 10 \
    --out "$out/bench_lm.json" 2>&1 | tail -6
