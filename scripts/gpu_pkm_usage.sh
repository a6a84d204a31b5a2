#!/usr/bin/env bash
# Product-key slot usage over a longer training (issue 4's "usage >= 80%" target): does
# usage grow with training once the model is past the CPU-length runs (600 steps)?
# Four trainings side by side on one GPU, each evaluated every 500 steps on 60K held-out
# tokens (metrics.jsonl: "eval" rows carry pkm_usage), each stopped by its time limit
# (SIGTERM: the trainer checkpoints and leaves; the curve so far stays in metrics.jsonl):
#   d256-3L   3 layers + PKM in the middle layer, d_model 256, bytes
#   d512-6L   6 layers + PKM at layer 4 (index 3), d_model 512, bytes
#   d256-bpe  as d256-3L on the 8K BPE corpus (memformers data build --tokenizer bpe ...)
#   d256-noBN as d256-3L without the query BatchNorm (the paper's ablation)
# then scripts/collect_pkm_usage.py OUT/*/ prints the usage curves.
# Usage: bash scripts/gpu_pkm_usage.sh OUT_DIR [SECONDS]   (default 480 s per job)
set -uo pipefail
out=${1:?output dir}
limit=${2:-480}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
common=(--set model.position=t5 --set model.xl_cache=true --set model.pkm.n_keys=512
        --set model.pkm.heads=4 --set model.pkm.k_dim=256 --set model.pkm.top_k=32
        --set data.segment_len=512 --set data.batch_size=32 --set train.steps=20000
        --set train.warmup_steps=300 --set train.eval_every=500 --set train.ckpt_every=0
        --set train.log_every=100 --set data.eval_max_docs=12 --set data.eval_max_tokens=60000
        --no-progress)
d256=(--set model.n_layers=3 --set model.d_model=256 --set model.n_heads=8
      --set model.head_dim=32 --set model.d_ff=1024 --set "model.pkm.layers=[1]"
      --set train.lr=1e-3)
job() {  # name, args...
    local name=$1; shift
    timeout -s TERM "$limit" python -m memformers train --run-dir "$out/$name" \
        "${common[@]}" "$@" > "$out/$name.log" 2>&1 &
}
job d256-3L "${d256[@]}" --set data.corpus=data/stdlib-byte
job d512-6L --set model.n_layers=6 --set model.d_model=512 --set model.n_heads=8 \
    --set model.head_dim=64 --set model.d_ff=2048 --set "model.pkm.layers=[3]" \
    --set train.lr=6e-4 --set data.corpus=data/stdlib-byte
job d256-bpe "${d256[@]}" --set data.corpus=data/stdlib-bpe
job d256-noBN "${d256[@]}" --set data.corpus=data/stdlib-byte --set model.pkm.query_norm=none
wait
