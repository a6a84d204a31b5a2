#!/usr/bin/env bash
# Product keys over a longer training on one GPU (issue 4): slot usage (target >= 80%)
# and quality at equal steps against dense models of depth 3 and 6.
# Four trainings side by side, all on the grouped corpus (one document per package, so
# near-identical generated files such as encodings/cp*.py cannot straddle splits):
#   pkm       3 layers + a 262,144-slot PKM in the middle layer, d_model 256
#   pkm-noBN  the same without the query BatchNorm (the paper's ablation)
#   dense-3L  3 dense layers           dense-6L  6 dense layers
# Each evaluates every 500 steps on the first 60K held-out tokens (metrics.jsonl "eval"
# rows; PKM rows carry pkm_usage), then on every token of the valid and test splits
# (eval-valid.json, eval-test.json). A job stopped by its time limit checkpoints and
# keeps its curve. Then: python scripts/collect_pkm_usage.py OUT/*/ --out PREFIX
# Usage: [SEED=0] [ONLY="pkm dense-3L"] bash scripts/gpu_pkm_usage.sh OUT_DIR [STEPS] [TRAIN_SECONDS]
#   (defaults 2500 steps, 440 s, seed 0, all four jobs; about 5 minutes on one H100)
# PKM jobs then run `memformers diagnose pkm-bn` (running vs per-batch BatchNorm statistics).
# Run 1 (results/gpu/pkm_usage_run1/) was this script's first version: the ungrouped
# corpus, no dense jobs, training until the time limit (500 s), d_model-512 and BPE jobs.
set -uo pipefail
out=${1:?output dir}
steps=${2:-2500}
limit=${3:-440}
corpus=data/stdlib-byte-grouped
seed=${SEED:-0}
only=${ONLY:-pkm pkm-noBN dense-3L dense-6L}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
common=(--set model.position=t5 --set model.xl_cache=true --set model.d_model=256
        --set model.n_heads=8 --set model.head_dim=32 --set model.d_ff=1024
        --set model.pkm.n_keys=512 --set model.pkm.heads=4 --set model.pkm.k_dim=256
        --set model.pkm.top_k=32 --set data.corpus=$corpus --set data.segment_len=512
        --set data.batch_size=32 --set train.steps="$steps" --set train.lr=1e-3
        --set train.warmup_steps=250 --set train.eval_every=500 --set train.ckpt_every=0
        --set train.log_every=100 --set data.eval_max_docs=0 --set data.eval_max_tokens=60000
        --set train.seed="$seed" --no-progress)
job() {  # name, args...
    local name=$1; shift
    [[ " $only " == *" $name "* ]] || return 0
    {
        timeout -s TERM "$limit" python -m memformers train --run-dir "$out/$name" \
            "${common[@]}" "$@"
        for split in valid test; do
            timeout 120 python -m memformers eval "$out/$name" --split "$split" \
                --max-docs 0 --max-tokens 0 --no-progress
        done
        if [[ $name == pkm ]]; then
            timeout 90 python -m memformers diagnose pkm-bn "$out/$name" --split valid
        fi
    } > "$out/$name.log" 2>&1 &
}
job pkm --set model.n_layers=3 --set "model.pkm.layers=[1]"
job pkm-noBN --set model.n_layers=3 --set "model.pkm.layers=[1]" --set model.pkm.query_norm=none
job dense-3L --set model.n_layers=3
job dense-6L --set model.n_layers=6
wait
