#!/usr/bin/env bash
# The Memorizing Transformers fine-tuning experiment on one GPU:
#   1. pretrain the base model (no memory) for BUDGET_S seconds  (gpu_pretrain_base.sh)
#   2. fine-tune it for STEPS steps with a 65K kNN memory, and for the same steps
#      without memory (the XL control), from the same weights and data
#   3. evaluate both on the held-out test split; the kNN model also with its
#      memory switched off (capacity 0: the same weights, no memory)
# Usage: bash scripts/gpu_knn_experiment.sh OUT_DIR [BUDGET_S] [STEPS] [BASE_WEIGHTS]
# (with BASE_WEIGHTS, e.g. src/memformers/assets/demo-base.safetensors, step 1 is skipped)
set -euo pipefail
out=${1:?output dir}; budget=${2:-240}; steps=${3:-1000}; base=${4:-}
if [ -z "$base" ]; then
    bash "$(dirname "$0")/gpu_pretrain_base.sh" "$out/base" "$budget"
    base="$out/base/model.safetensors"
fi
common=(--config configs/demo/base.toml --no-progress --set train.steps="$steps"
        --set train.lr=1e-3 --set train.warmup_steps=100 --set train.ckpt_every=0
        --set train.init_from="$base" --set train.log_every=100)
python -m memformers train "${common[@]}" --run-dir "$out/knn" --set model.knn.capacity=65536
python -m memformers train "${common[@]}" --run-dir "$out/xl"
python -m memformers eval "$out/knn" --split test --max-docs 0 --set data.eval_max_tokens=0 --out "$out/knn/test.json"
python -m memformers eval "$out/knn" --split test --max-docs 0 --set data.eval_max_tokens=0 \
    --set model.knn.capacity=0 \
    --out "$out/knn/test-memory-off.json"
python -m memformers eval "$out/xl" --split test --max-docs 0 --set data.eval_max_tokens=0 --out "$out/xl/test.json"
