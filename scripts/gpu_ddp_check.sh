#!/usr/bin/env bash
# Multi-process training on CUDA: the NCCL path and bf16 (run on a GPU machine).
#
#   bash scripts/gpu_ddp_check.sh              # NPROC=1: torchrun with one process
#   NPROC=4 bash scripts/gpu_ddp_check.sh      # one process per GPU (data.batch_size=8)
#   STEPS=10 EXTRA='--set train.precision="fp32"' bash scripts/gpu_ddp_check.sh  # CPU smoke
#
# Builds its own tiny corpus (standard-library text), then trains the same small
# model (XL cache, kNN memory, product-key memory) four ways, bf16 autocast:
#   single  plain `memformers train`, no process group
#   ddp     torchrun --nproc_per_node=$NPROC (DDP over NCCL)
#   fsdp    the same with train.parallel="fsdp" (FSDP2 fully_shard)
#   resumed the ddp run restarted from its mid-run checkpoint (memformers train --nproc)
# and checks that their train and held-out losses agree to bf16 tolerance.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
NPROC=${NPROC:-1}
STEPS=${STEPS:-60}  # even: the resumed run restarts from the checkpoint at STEPS / 2
read -r -a EXTRA <<< "${EXTRA:-}"
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT

python - "$W/text" <<'EOF'
import sys, sysconfig
from pathlib import Path
out = Path(sys.argv[1]); out.mkdir()
files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:80]
for f in files:
    (out / (f.stem + ".txt")).write_text(f.read_text(errors="replace")[:20000])
EOF
python -m memformers data build --source "$W/text" --out "$W/corpus" --quiet

SETS=(--no-progress
      --set "data.corpus=\"$W/corpus\"" --set data.batch_size=8 --set data.segment_len=128
      --set data.eval_max_docs=8 --set model.n_layers=4 --set model.d_model=128
      --set model.n_heads=4 --set model.head_dim=32 --set model.d_ff=512
      --set model.xl_cache=true --set model.knn.layers=[2] --set model.knn.capacity=1024
      --set model.pkm.layers=[1] --set model.pkm.n_keys=32 --set model.pkm.k_dim=64
      --set model.pkm.query_norm=\"layernorm\"
      --set train.steps="$STEPS" --set train.warmup_steps=10
      --set train.ckpt_every=$((STEPS / 2)) --set train.log_every=1
      --set train.precision=\"bf16\" "${EXTRA[@]}")

python -m memformers train --run-dir "$W/single" "${SETS[@]}"
torchrun --standalone --nproc_per_node="$NPROC" -m memformers train --run-dir "$W/ddp" \
    "${SETS[@]}"
torchrun --standalone --nproc_per_node="$NPROC" -m memformers train --run-dir "$W/fsdp" \
    "${SETS[@]}" --set train.parallel=\"fsdp\"

# resume: the ddp run as it was at its mid-run checkpoint, continued by --nproc
cp -r "$W/ddp" "$W/resumed"
rm -rf "$W/resumed/checkpoints/step_$(printf %07d "$STEPS")" "$W/resumed/model.safetensors" \
    "$W/resumed/eval.json"
python -m memformers train --nproc "$NPROC" --run-dir "$W/resumed" --resume --no-progress

python - "$W" "$STEPS" <<'EOF'
import json, sys
from pathlib import Path
w, steps = Path(sys.argv[1]), int(sys.argv[2])

def train_loss(run):  # mean of the last 10 steps (a resumed run logs some steps twice)
    rows = [json.loads(x) for x in (w / run / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(by_step) == list(range(1, steps + 1)), run
    last = sorted(by_step)[-10:]
    return sum(by_step[s] for s in last) / len(last)

def eval_loss(run):
    return json.loads((w / run / "eval.json").read_text())["loss"]

ref_t, ref_e = train_loss("single"), eval_loss("single")
print(f"single: train {ref_t:.4f}  held-out {ref_e:.4f}")
ok = True
for run in ("ddp", "fsdp", "resumed"):
    t, e = train_loss(run), eval_loss(run)
    good = abs(t - ref_t) / ref_t < 0.02 and abs(e - ref_e) / ref_e < 0.02
    ok &= good
    print(f"{run}: train {t:.4f}  held-out {e:.4f}  {'ok' if good else 'MISMATCH'}")
ddp_resumed = abs(eval_loss("resumed") - eval_loss("ddp")) / eval_loss("ddp")
print(f"resumed vs uninterrupted ddp: held-out loss rel. diff {ddp_resumed:.2e}")
ok &= ddp_resumed < 5e-3
sys.exit(0 if ok else 1)
EOF
echo "gpu ddp check: OK"
