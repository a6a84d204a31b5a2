#!/usr/bin/env bash
# The reference packages' own environment for benchmarks/bench_peers.py.
#
#     bash benchmarks/peers_env.sh            # creates .venv-peers in the repository root
#     .venv-peers/bin/python benchmarks/bench_peers.py
#
# The venv sees the system site-packages, so it uses the system torch (never
# downloaded here) and the system faiss-cpu, numpy, filelock, tqdm, packaging.
# Every package is installed with --no-deps and pinned; the non-torch
# dependencies are the Requires-Dist lines of the three wheels (and of their
# dependencies), named explicitly:
#   memorizing-transformers-pytorch 0.4.1: einops, einops-exts (imported), filelock,
#       joblib, numpy, faiss-gpu (NOT installed: the system faiss-cpu provides `faiss`;
#       the package only builds CPU indexes), torch
#   product-key-memory 0.3.0: colt5-attention, einops, torch
#     colt5-attention 0.11.2: einops, local-attention, packaging, torch
#     local-attention 1.11.2: einops, hyper-connections, torch
#     hyper-connections 0.4.11: einops, torch-einops-utils, torch
#   infini-transformer-pytorch 0.2.1: einops, rotary-embedding-torch, tqdm, torch
# Nothing here touches the system environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-peers
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install --no-deps \
    memorizing-transformers-pytorch==0.4.1 \
    product-key-memory==0.3.0 \
    infini-transformer-pytorch==0.2.1 \
    einops==0.8.2 \
    einops-exts==0.0.4 \
    joblib==1.6.0 \
    colt5-attention==0.11.2 \
    local-attention==1.11.2 \
    hyper-connections==0.4.11 \
    torch-einops-utils==0.2.0 \
    rotary-embedding-torch==0.9.1

"$VENV/bin/python" - <<'EOF'
import faiss, numpy, torch  # from the system site-packages
import infini_transformer_pytorch, memorizing_transformers_pytorch, product_key_memory  # noqa
from importlib.metadata import version
print("torch", torch.__version__, "| faiss", faiss.__version__, "| numpy", numpy.__version__)
for p in ("memorizing-transformers-pytorch", "product-key-memory", "infini-transformer-pytorch"):
    print(p, version(p))
assert torch.__version__.endswith("+cpu") or "+" not in torch.__version__, torch.__version__
EOF
