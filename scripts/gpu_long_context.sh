#!/usr/bin/env bash
# Session-4 GPU figures (one H100, bf16 autocast), as they were measured:
#   1. product-key layer vs FFN and dense vs sparse value gradients on CUDA (alone on the GPU)
#   2. kNN passkey retrieval at 1,048,576 tokens: the shipped passkey-knn model with a
#      1M-entry exact memory; one job per needle depth, 3 prompts each (batched)
#   3. Infini-attention passkey fine-tuning with BPTT through all 16 segments of a 4K prompt
#      (weights kept for scripts/infini_diagnose.py)
#   4. the sorting task at T = 2K / 4K / 8K, 500 steps, learning curves every 100 steps;
#      then scripts/collect_sorting.py OUT/sort-*/ --step 500 --out OUT/sorting_500steps
# Stages 2-4 run their jobs side by side; each job has its own time limit.
# Usage: bash scripts/gpu_long_context.sh OUT_DIR   (about 20 minutes on one H100)
set -uo pipefail
out=${1:?output dir}
mkdir -p "$out"/logs
export PYTHONPATH=src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
run() { local name=$1; shift; timeout 560 "$@" > "$out/logs/$name.log" 2>&1 & }

timeout 150 python benchmarks/bench_pkm.py --device cuda --full --repeats 9 \
    --out "$out/pkm_gpu.json" > "$out/logs/pkm.log" 2>&1

# A 1M-entry memory per (prompt, head): 8 x 1M x 32 x 2 x 2 B = 1 GiB per prompt; search
# tiles of 256M fp32 scores (1 GiB) keep three jobs within the GPU's memory.
for d in 0.1 0.5 0.9; do
    run "knn1m-$d" python -m memformers eval passkey-knn --out "$out/knn1m-$d" \
        --set model.knn.capacity=1048576 --set model.knn.search_chunk=65536 \
        --set model.knn.search_tile=268435456 --passkey-lengths 1048576 \
        --passkey-depths "$d" --passkey-samples 3
done
run infini-bptt16 python -m memformers train --config configs/passkey-finetune.toml \
    --run-dir "$out/infini-bptt16" --set train.bptt_segments=16 --set train.steps=600 \
    --set train.ckpt_every=100 --set model.knn.layers=[] --set "model.infini.layers=[3]" \
    --set task.eval_lengths=[4096,16384] --set task.eval_samples=4
wait

sort_variant() {  # name, length, --set values...
    local name=$1 T=$2; shift 2
    local sets=(); for s in "$@"; do sets+=(--set "$s"); done
    run "sort-$name-$T" python -m memformers sorting --config configs/sorting-8k-gpu.toml \
        --lengths "$T" --steps 500 --eval-every 100 --samples 64 --no-progress \
        --out "$out/sort-$name-$T" "${sets[@]}"
}
for T in 2048 4096 8192; do
    sort_variant xl "$T"
    sort_variant continuous-sticky "$T" "model.continuous.layers=[0, 1, 2]"
done
sort_variant continuous-uniform 8192 "model.continuous.layers=[0, 1, 2]" \
    "model.continuous.sticky=false"
wait
sort_variant knn 8192 "model.knn.layers=[1]"
sort_variant infini 8192 "model.xl_cache=false" "model.infini.layers=[1]"
wait
python scripts/collect_sorting.py "$out"/sort-*/ --step 500 --out "$out/sorting_500steps"
