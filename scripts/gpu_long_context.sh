#!/usr/bin/env bash
# Session-4 GPU figures (one H100, bf16 autocast), all in one call:
#   1. product-key layer vs FFN and dense vs sparse value gradients on CUDA (alone on the GPU)
#   2. kNN passkey retrieval at 1,048,576 tokens with the shipped passkey-knn model and a
#      1M-entry exact memory (one process per needle depth)
#   3. Infini-attention passkey fine-tuning with BPTT through every segment of a 4K prompt,
#      delta and linear update rules (weights kept for scripts/infini_diagnose.py)
#   4. the sorting task at T = 8,192 for five variants, with a learning curve
# Everything but (1) runs at once; each job has its own time limit (LIMIT_S).
# Usage: bash scripts/gpu_long_context.sh OUT_DIR [LIMIT_S]
set -uo pipefail
out=${1:?output dir}; limit=${2:-420}
mkdir -p "$out"/logs
export PYTHONPATH=src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/logs/gpu.txt"

timeout 150 python benchmarks/bench_pkm.py --device cuda --full --repeats 9 \
    --out "$out/pkm_gpu.json" > "$out/logs/pkm.log" 2>&1

for d in 0.1 0.5 0.9; do
    timeout "$limit" python scripts/passkey_finetune.py --out "$out/knn1m-$d" --init passkey-knn \
        --steps 0 --set model.knn.capacity=1048576 --eval-lengths 1048576 --eval-depths "$d" \
        --samples 2 > "$out/logs/knn1m-$d.log" 2>&1 &
done
for rule in delta linear; do
    timeout "$limit" python scripts/passkey_finetune.py --out "$out/infini-$rule" \
        --grad-segments 16 --steps 1000 --set "model.infini.layers=[3]" \
        --set "model.infini.update=$rule" --eval-lengths 4096,16384 --samples 4 \
        > "$out/logs/infini-$rule.log" 2>&1 &
done
sort_variant() {  # name, --set values...
    local name=$1; shift
    local sets=(); for s in "$@"; do sets+=(--set "$s"); done
    timeout "$limit" python -m memformers sorting --config configs/sorting-8k-gpu.toml \
        --lengths 8192 --steps 3000 --eval-every 100 --samples 64 --no-progress \
        --out "$out/sort-$name" "${sets[@]}" > "$out/logs/sort-$name.log" 2>&1 &
}
sort_variant xl
sort_variant continuous-uniform "model.continuous.layers=[0, 1, 2]" "model.continuous.sticky=false"
sort_variant continuous-sticky "model.continuous.layers=[0, 1, 2]" "model.continuous.sticky=true"
sort_variant knn "model.knn.layers=[1]"
sort_variant infini "model.xl_cache=false" "model.infini.layers=[1]"
wait
nvidia-smi --query-gpu=memory.used --format=csv,noheader >> "$out/logs/gpu.txt"
