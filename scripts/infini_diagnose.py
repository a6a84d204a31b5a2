"""Why does a passkey-fine-tuned Infini-attention model miss a key stored segments ago?

For each length, ``--samples`` pairs of passkey prompts identical but for the key
digits (needle at ``--depth``) are fed segment by segment (segment_len of the config,
fresh state, eval, no grad); hooks on every InfiniMemory record what it stores and
reads (memformers.diagnostics.infini_probe). Per Infini layer and head, means over samples:

  gate        sigmoid(beta), eq. (6): the share the memory gets in the output
  share       the needle digits' share of the eq. (3) normaliser sigma(q) z at the
              answer positions; unif = n_needle / n_stored; ratio = share / unif
  s_*         ||X(A) - X(B)|| / ||X(A)|| at the answer positions for X = A_mem (eq. 3;
              s_memQ: A's query read from both memories, so only the memory content
              differs), local attention, gated output (eq. 6): does the key get through?
              "@1st": at the first answer position only, whose input is the same in A
              and B (the later ones are fed the differing key digits, teacher forced)
  |M| , sum z  after the first / middle / last segment (eq. 4 grows, eq. 5 may saturate)

and for the model: teacher-forced probability of the key digits and exact match of
their argmax. A second section (skip with --no-probe) is the memory's intrinsic
capacity: N random bindings written through InfiniMemory alone, needle read back.

    PYTHONPATH=src python scripts/infini_diagnose.py --weights runs/pk-infini \\
        --set "model.infini.layers=[3]" --lengths 1024,4096,16384 --samples 4 --out diag.json

Without --weights the model is randomly initialised (a smoke run; stated in the output).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from memformers.config import load_config
from memformers.data.tokenizer import ByteTokenizer
from memformers.diagnostics.infini_probe import (
    capacity_probe,
    diagnose_passkey,
    make_passkey_pair,
)
from memformers.model import MemformerLM
from memformers.pretrained import resolve_weights
from memformers.train.checkpoint import load_model_weights


def print_length(r: dict, n_layers: int) -> None:
    m = r["model"]
    back = r["needle_segments_back"]
    print(f"\n== length {r['length']}: {r['segments']} segments of which {r['n_stored']} tokens "
          f"in memory at the last; needle digits at {r['needle_positions'][0]}.."
          f"{r['needle_positions'][-1]}, {back} segment(s) back (the XL cache reaches 1, "
          f"chained through the {n_layers} layers' caches up to {n_layers})")
    print(f"   model: p(key digits) = {m['p_digits']:.3f}   exact match = {m['exact_match']:.2f}")
    print("   lay hd upd    gate share   unif    ratio | s_mem s_memQ  s_loc  s_out |"
          " @1st: s_loc  s_out |  |M|_F first/mid/last  sum z last")
    for lay in r["layers"].values():
        s, s1 = lay["readout_sensitivity"], lay["readout_sensitivity_first"]
        for h, gate in enumerate(lay["gate"]):
            mf, zs = lay["memory_norm"]["M_fro_summary"][h], lay["memory_norm"]["z_sum_summary"][h]
            ratio = lay["share_ratio"][h] if lay["share_ratio"] else float("nan")
            print(f"   {lay['layer']:>3} {h:>2} {lay['update']:<6} {gate:.3f} "
                  f"{lay['needle_share'][h]:.5f} {lay['uniform_share']:.5f} {ratio:5.2f} |"
                  f"{s['memory'][h]:6.3f} {s['memory_same_query'][h]:6.3f} {s['local'][h]:6.3f} "
                  f"{s['output'][h]:6.3f} |      {s1['local'][h]:6.3f} {s1['output'][h]:6.3f} |"
                  f" {mf['first']:8.3g}/{mf['middle']:8.3g}/{mf['last']:8.3g} {zs['last']:10.4g}")
        c = lay["checks"]
        print(f"   checks (layer {lay['layer']}): A_mem vs module max|err| "
              f"{c['a_mem_vs_module_max_abs']:.1e}, z rel err {c['z_rel_err']:.1e}")


def print_probe(rows: list[dict]) -> None:
    print("\n== capacity probe: InfiniMemory alone, needle read back with its own key")
    print("   keys      N      share(unif)      cos linear   cos delta")
    by = {(r["keys"], r["N"], r["update"]): r for r in rows}
    for kind, n in dict.fromkeys((r["keys"], r["N"]) for r in rows):
        lin, dlt = by.get((kind, n, "linear")), by.get((kind, n, "delta"))
        share = (lin or dlt)["share"]
        print(f"   {kind:<9} {n:>5} {share:.5f}({1 / n:.5f}) "
              f"{lin['cosine'] if lin else float('nan'):11.3f} "
              f"{dlt['cosine'] if dlt else float('nan'):11.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=None,
                   help="weights (.safetensors, run directory or shipped name); none: random init")
    p.add_argument("--config", default="configs/demo/base.toml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--lengths", default="1024,4096,16384")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--depth", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON file for every number")
    p.add_argument("--no-probe", action="store_true", help="skip the capacity probe")
    p.add_argument("--probe-ns", default="16,64,256,1024,4096")
    p.add_argument("--probe-trials", type=int, default=32)
    p.add_argument("--probe-key-scale", type=float, default=1.0,
                   help="std of the probe's Gaussian keys")
    args = p.parse_args()

    cfg = load_config(args.config, args.set)
    if not cfg.model.infini.layers:
        raise SystemExit("error: the model has no Infini-attention layer; "
                         "add e.g. --set 'model.infini.layers=[3]'")
    seg = cfg.data.segment_len
    lengths = [int(x) for x in args.lengths.split(",")]
    if any(n % seg for n in lengths):
        raise SystemExit(f"error: lengths must be multiples of segment_len {seg}")
    torch.manual_seed(args.seed)
    model = MemformerLM(cfg.model).to(args.device)
    if args.weights:
        path = resolve_weights(args.weights)
        missing = load_model_weights(model, path, strict=False)
        weights = str(path)
        print(f"weights: {path} ({len(missing)} model tensors not in the file)")
    else:
        weights = "RANDOM INIT (no --weights): a smoke run, not a diagnosis of a trained model"
        print(f"weights: {weights}")
    print(f"config: {args.config} {' '.join(args.set)}; segment_len {seg}, "
          f"depth {args.depth}, {args.samples} sample(s) per length")

    tok = ByteTokenizer()
    res = {"weights": weights, "config": args.config, "sets": args.set, "segment_len": seg,
           "depth": args.depth, "samples": args.samples, "lengths": []}
    for n in lengths:
        start = time.time()
        rng = np.random.default_rng([args.seed, n])
        pairs = [make_passkey_pair(tok, n, args.depth, rng) for _ in range(args.samples)]
        r = diagnose_passkey(model, pairs, seg, device=args.device)
        r["seconds"] = round(time.time() - start, 1)
        res["lengths"].append(r)
        print_length(r, cfg.model.n_layers)

    if not args.no_probe:
        rows = capacity_probe([int(x) for x in args.probe_ns.split(",")], cfg.model.head_dim,
                              trials=args.probe_trials, chunk=seg,
                              key_scale=args.probe_key_scale, seed=args.seed)
        res["capacity_probe"] = {"d_k": cfg.model.head_dim, "chunk": seg, "n_patterns": 64,
                                 "key_scale": args.probe_key_scale, "rows": rows}
        print_probe(rows)

    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
