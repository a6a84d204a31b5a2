"""Held-out losses of demo-base with and without memories: a fingerprint of the code path.

Run it at two commits; a refactor that changes no behaviour prints the same numbers:

    python scripts/eval_fingerprint.py            # needs data/stdlib-byte-grouped (README)
"""

import json

import torch

from memformers.cli import load_trained_model
from memformers.data.corpus import CorpusSplit
from memformers.evaluate.lm import evaluate_lm

torch.manual_seed(0)
split = CorpusSplit.open("data/stdlib-byte-grouped", "valid")
out = {}
for sets in ([], ["model.knnlm.capacity=8192"], ["model.knn.capacity=4096"]):
    cfg, model, tok = load_trained_model("demo-base", [*sets, "data.batch_size=4"], "cpu")
    r = evaluate_lm(model, split, tok.token_bytes, batch_size=4, segment_len=256, max_docs=8,
                    max_tokens=40000, progress=False)
    out[" ".join(sets) or "base"] = round(r["loss"], 6)
print(json.dumps(out))
