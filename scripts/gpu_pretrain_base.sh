#!/usr/bin/env bash
# Pretrain the demo's base model (configs/demo/base.toml) on one GPU, sized to a
# time budget: a 60-step probe measures step time, then the run takes as many
# steps as fit in BUDGET_S seconds (default 360). Usage:
#   bash scripts/gpu_pretrain_base.sh OUT_DIR [BUDGET_S]
set -euo pipefail
out=${1:?output dir}; budget=${2:-360}
export PYTHONUNBUFFERED=1
python -m memformers data build --group-by-package --split 0.8,0.1,0.1 \
    --out data/stdlib-byte-grouped --quiet >/dev/null 2>&1 || true   # no-op if present
rm -rf /tmp/probe
python -m memformers train --config configs/demo/base.toml --run-dir /tmp/probe --no-progress \
    --set train.steps=60 --set train.ckpt_every=0 --set data.eval_max_tokens=1000 >/dev/null
steps=$(python - "$budget" <<'PY'
import json, sys
rows = [json.loads(l) for l in open("/tmp/probe/metrics.jsonl") if '"loss"' in l]
tok_s = rows[-1]["tokens_per_s"]
print(int(float(sys.argv[1]) * tok_s / (32 * 256)) // 100 * 100)
PY
)
echo "probe: $(tail -1 /tmp/probe/metrics.jsonl)"; echo "steps: $steps"
python -m memformers train --config configs/demo/base.toml --run-dir "$out" --no-progress \
    --set train.steps="$steps" --set train.log_every=100
