"""memformers side by side with the reference PyTorch packages (issues 3, 4, 5).

    bash benchmarks/peers_env.sh                      # once: .venv-peers with the packages
    .venv-peers/bin/python benchmarks/bench_peers.py [--only knn,pkm,infini] [--steps N]
                                                     [--threads N] [--out FILE.json]
    .venv-peers/bin/python benchmarks/bench_peers.py --report benchmarks/results/peers.json

On a loaded machine prefer ``--threads 1``: with every core busy, two torch threads
spend much of each small op waiting for each other (BENCHMARKS.md). ``--threads``
also sets faiss's OpenMP threads. Whole run: ~5 min with 1 thread, ~11 min with 2
(2 cores, load ~6).

Every pair is built at the same sizes, warmed up, then timed with the contenders
interleaved in every repetition (the order rotates each repetition), so load on
the shared machine hits all of them alike; medians over the repetitions, and
ratios of the medians, all from this one run.

* knn (issue 3): training steps (forward + backward + optimizer) at the benchmark
  config (6 layers, d_model 256, 8 heads x 32, FFN 1024, segment 512, 2 streams,
  byte vocabulary, XL cache, kNN at layer 4 with top-32) for memformers xl+knn,
  memformers xl (the 0.5x target),
  ``memorizing_transformers_pytorch.MemorizingTransformer`` (kNN at its layer 5 =
  our layer 4, XL memories of 512 on every layer) and the same package model
  without its kNN layer (model cost vs kNN cost). Both kNN memories hold 65,536
  tokens per stream before timing. Ours is one FIFO per (stream, head) (the
  package: one faiss HNSW index per stream, keys shared by its multi-query heads).
  ``--fill direct`` (default) writes 65,536 random unit-norm keys (and random
  values) per memory through each memory's own write API (our ``KNNStore.write``,
  the package's ``KNNMemory.add``); ``--fill model`` streams 128 segments through
  each model instead (129 for the package: a segment reaches its kNN memory when
  it leaves the XL memory), without gradients (13 min for the two with 1 thread).
  The package resets an index when it grows past ``max_knn_memories`` (no FIFO),
  so it gets ``capacity + 512 * (warmup + steps + 1)`` rows to stay full while timed.
* pkm (issue 4): forward + backward of one layer on a (4, 512, 256) input:
  memformers ``ProductKeyMemory`` (512^2 = 262,144 slots, 4 heads, k_dim 256, top-32,
  dense and sparse value gradients), ``product_key_memory.PKM`` (num_keys 512,
  heads 4, dim_head 128 = half of our k_dim, topk 32) and the dense FFN 256-1024-256.
* infini (issue 5): training steps at the benchmark config without XL cache for
  memformers with Infini-attention on every layer (as the package) -- with the
  config's T5 bias and with RoPE (the package's choice) -- and
  ``infini_transformer_pytorch.InfiniTransformer`` (delta rule, as our default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's memformers, not an installed one

import torch  # noqa: E402
from bench_lm import BASE, PRESETS, train_step  # noqa: E402
from bench_pkm import D_FF, D_MODEL, fwd_bwd, inputs, make_pkm  # noqa: E402

import memformers  # noqa: E402
from memformers.config import load_config  # noqa: E402
from memformers.model import MemformerLM, lm_loss  # noqa: E402
from memformers.model.ffn import MLP  # noqa: E402
from memformers.train.optim import build_optimizers  # noqa: E402

B, L, VOCAB = 2, 512, 256
PEERS = ("memorizing-transformers-pytorch", "product-key-memory", "infini-transformer-pytorch")
TARGETS = {
    "knn_vs_xl": ">= 0.5 (memformers xl+knn / memformers xl, train tok/s)",
    "knn_vs_peer": ">= 2.0 (memformers / memorizing-transformers-pytorch, train tok/s)",
    "knn_ivf_vs_xl": ">= 0.8 (memformers xl+knn with the ivf backend / memformers xl)",
    "knn_ivf_vs_peer": ">= 2.0 (memformers ivf / memorizing-transformers-pytorch)",
    "pkm_vs_ffn": "<= 1.5 (memformers PKM / dense FFN, fwd+bwd time)",
    "pkm_vs_peer": "< 1.0 (memformers PKM / product-key-memory, fwd+bwd time)",
    "infini_vs_peer": ">= 1.5 (memformers / infini-transformer-pytorch, train tok/s)",
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def interleaved(fns: dict[str, Callable[[int], float]], warmup: int, reps: int,
                label: str) -> dict[str, list[float]]:
    """Run every contender once per repetition, rotating the order; seconds per call."""
    names = list(fns)
    for i in range(warmup):
        for n in names:
            t = fns[n](-1 - i)
            print(f"  [{label}] warmup {i} {n}: {t:.2f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for j in range(len(names)):
            n = names[(r + j) % len(names)]
            times[n].append(fns[n](r))
            print(f"  [{label}] rep {r} {n}: {times[n][-1]:.2f} s", file=sys.stderr, flush=True)
    return times


def summary(times: list[float], tokens: int | None = None) -> dict:
    med = statistics.median(times)
    out = {"times_s": times, "median_s": med}
    if tokens:
        out["tokens_per_s"] = tokens / med
    return out


# --------------------------------------------------------------------------- LM steps


def our_lm(overrides: list[str]):
    cfg = load_config(None, BASE + overrides)
    torch.manual_seed(0)
    model = MemformerLM(cfg.model)
    model.allocate_state(B, "cpu")
    return model, build_optimizers(model, cfg.train), cfg


def our_step(model, opts, seq: torch.Tensor) -> float:
    t = time.perf_counter()
    train_step(model, opts, seq)
    return time.perf_counter() - t


def batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (B, L + 1), generator=g) for _ in range(n)]


def random_kv(rows: int, heads: int, d: int, g: torch.Generator):
    k = torch.nn.functional.normalize(torch.randn(B, heads, rows, d, generator=g), dim=-1)
    return k, torch.randn(B, heads, rows, d, generator=g)


# --------------------------------------------------------------------------- kNN


def bench_knn(args) -> dict:
    from memorizing_transformers_pytorch import MemorizingTransformer

    cap = args.capacity
    ours, ours_opts, cfg = our_lm(["model.xl_cache=true", "model.knn.layers=[4]",
                                   f"model.knn.capacity={cap}", *args.knn_set])
    ivf, ivf_opts, _ = our_lm(["model.xl_cache=true", "model.knn.layers=[4]",
                               f"model.knn.capacity={cap}", "model.knn.backend=ivf",
                               *args.knn_set])
    ivf32, ivf32_opts, _ = our_lm(["model.xl_cache=true", "model.knn.layers=[4]",
                                   f"model.knn.capacity={cap}", "model.knn.backend=ivf",
                                   "model.knn.ivf_codes='fp32'", *args.knn_set])
    xl, xl_opts, _ = our_lm(PRESETS["xl"])
    layer = cfg.model.knn.layers[0]
    tmp = tempfile.TemporaryDirectory(prefix="peers-knn-")
    torch.manual_seed(0)
    calls = args.warmup + args.steps
    theirs = MemorizingTransformer(
        num_tokens=VOCAB, dim=256, depth=6, dim_head=32, heads=8, ff_mult=4,
        memorizing_layers=(layer + 1,), max_knn_memories=cap + L * (calls + 1),
        num_retrieved_memories=cfg.model.knn.top_k, xl_max_memories=L,
        knn_memories_directory=tmp.name)
    their_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    mems = theirs.create_knn_memories(batch_size=B)
    torch.manual_seed(0)  # the package's model with no kNN layer: its XL-only cost
    plain = MemorizingTransformer(num_tokens=VOCAB, dim=256, depth=6, dim_head=32, heads=8,
                                  ff_mult=4, memorizing_layers=(), xl_max_memories=L,
                                  knn_memories_directory=tmp.name)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    state = {"xl": None, "plain_xl": None}

    # fill both memories to `cap` tokens per stream
    fill = {}
    store = ours.blocks[layer].attn.memory.store
    ivf_store = ivf.blocks[layer].attn.memory.store
    ivf32_store = ivf32.blocks[layer].attn.memory.store
    g = torch.Generator().manual_seed(1)
    t = time.perf_counter()
    if args.fill == "direct":
        for _ in range(cap // L):
            k, v = random_kv(L, 8, 32, g)
            for st in (store, ivf_store, ivf32_store):
                st.write(k, v, torch.ones(B, L, dtype=torch.bool))
    else:
        with torch.no_grad():
            for seq in batches(cap // L, 2):
                ours(seq[:, :-1])
                ivf(seq[:, :-1])
                ivf32(seq[:, :-1])
        ours.detach_state()
        ivf.detach_state()
        ivf32.detach_state()
    fill["ours_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if args.fill == "direct":
        for _ in range(cap // L):
            k, v = random_kv(L, 1, 32, g)
            mems[0].add(torch.stack((k[:, 0], v[:, 0]), dim=-2))  # (B, L, kv, d)
    else:
        with torch.no_grad():  # +1: a segment reaches its kNN memory when it leaves XL
            for seq in batches(cap // L + 1, 2):
                _, state["xl"] = theirs(seq[:, :-1], knn_memories=mems,
                                        xl_memories=state["xl"], labels=seq[:, 1:])
    fill["theirs_s"] = time.perf_counter() - t
    fill["ours_rows_per_memory"] = [int(c) for c in store.count.tolist()]
    fill["theirs_rows_per_index"] = [int(k.index.ntotal) for k in mems[0].knns]
    print(f"  [knn] filled: ours {fill['ours_s']:.1f} s, package {fill['theirs_s']:.1f} s "
          f"({fill['theirs_rows_per_index']} rows)", file=sys.stderr, flush=True)

    data = batches(calls, 3)

    def their_step(r: int) -> float:
        seq = data[r]
        t = time.perf_counter()
        loss, state["xl"] = theirs(seq[:, :-1], knn_memories=mems, xl_memories=state["xl"],
                                   labels=seq[:, 1:])
        loss.backward()
        their_opt.step()
        their_opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    def plain_step(r: int) -> float:
        seq = data[r]
        t = time.perf_counter()
        loss, state["plain_xl"] = plain(seq[:, :-1], knn_memories=[],
                                        xl_memories=state["plain_xl"], labels=seq[:, 1:])
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    times = interleaved({
        "memformers xl+knn": lambda r: our_step(ours, ours_opts, data[r]),
        "memformers xl+knn ivf": lambda r: our_step(ivf, ivf_opts, data[r]),
        "memformers xl+knn ivf, fp32 codes": lambda r: our_step(ivf32, ivf32_opts, data[r]),
        "memformers xl": lambda r: our_step(xl, xl_opts, data[r]),
        "memorizing-transformers-pytorch": their_step,
        "memorizing-transformers-pytorch, no kNN layer": plain_step,
    }, args.warmup, args.steps, "knn")
    rows_after = [int(k.index.ntotal) for k in mems[0].knns]
    mems.clear()  # drop the package's indexes and memmaps before removing their directory
    tmp.cleanup()
    res = {name: summary(ts, B * L) for name, ts in times.items()}
    res["memformers xl+knn"]["params"] = n_params(ours)
    res["memformers xl+knn ivf"]["params"] = n_params(ivf)
    res["memformers xl+knn ivf, fp32 codes"]["params"] = n_params(ivf32)
    res["memformers xl"]["params"] = n_params(xl)
    res["memorizing-transformers-pytorch"]["params"] = n_params(theirs)
    res["memorizing-transformers-pytorch, no kNN layer"]["params"] = n_params(plain)
    tok = {n: r["tokens_per_s"] for n, r in res.items()}
    vs_xl = tok["memformers xl+knn"] / tok["memformers xl"]
    vs_peer = tok["memformers xl+knn"] / tok["memorizing-transformers-pytorch"]
    ivf_vs_xl = tok["memformers xl+knn ivf"] / tok["memformers xl"]
    ivf_vs_peer = tok["memformers xl+knn ivf"] / tok["memorizing-transformers-pytorch"]
    plain_tok = tok["memorizing-transformers-pytorch, no kNN layer"]
    return {"contenders": res, "fill": fill | {"mode": args.fill, "capacity": cap,
                                                "theirs_rows_after_timing": rows_after},
            "ratios": {"knn_vs_xl": vs_xl, "knn_vs_peer": vs_peer,
                       "knn_ivf_vs_xl": ivf_vs_xl, "knn_ivf_vs_peer": ivf_vs_peer,
                       "xl_vs_peer_no_knn": tok["memformers xl"] / plain_tok,
                       "peer_knn_vs_peer_no_knn": tok["memorizing-transformers-pytorch"]
                       / plain_tok},
            "pass": {"knn_vs_xl": vs_xl >= 0.5, "knn_vs_peer": vs_peer >= 2.0,
                     "knn_ivf_vs_xl": ivf_vs_xl >= 0.8, "knn_ivf_vs_peer": ivf_vs_peer >= 2.0}}


# --------------------------------------------------------------------------- PKM


def bench_pkm(args) -> dict:
    from product_key_memory import PKM

    ns = argparse.Namespace(batch=4, seq=512, device="cpu", k_dim=256)
    torch.manual_seed(0)
    x, mask = inputs(ns)
    mods = {
        "dense FFN 256-1024-256": MLP(D_MODEL, D_FF),
        "memformers PKM (dense grads)": make_pkm(512, False, ns),
        "memformers PKM (sparse grads)": make_pkm(512, True, ns),
        "product-key-memory PKM": PKM(dim=D_MODEL, heads=4, num_keys=512, topk=32,
                                      dim_head=ns.k_dim // 2),
    }
    fns = {name: (lambda r, m=m: fwd_bwd(m, x, mask, "cpu")) for name, m in mods.items()}
    times = interleaved(fns, args.warmup, args.pkm_reps, "pkm")
    res = {name: summary(ts) | {"params": n_params(mods[name])} for name, ts in times.items()}
    ffn = res["dense FFN 256-1024-256"]["median_s"]
    peer = res["product-key-memory PKM"]["median_s"]
    for r in res.values():
        r["vs_ffn"] = r["median_s"] / ffn
        r["vs_peer"] = r["median_s"] / peer
    ours = res["memformers PKM (dense grads)"]
    sparse = res["memformers PKM (sparse grads)"]
    return {"contenders": res, "input": [ns.batch, ns.seq, D_MODEL],
            "ratios": {"pkm_vs_ffn": ours["vs_ffn"], "pkm_vs_peer": ours["vs_peer"],
                       "pkm_sparse_vs_ffn": sparse["vs_ffn"],
                       "pkm_sparse_vs_peer": sparse["vs_peer"]},
            "pass": {"pkm_vs_ffn": ours["vs_ffn"] <= 1.5, "pkm_vs_peer": ours["vs_peer"] < 1.0}}


# --------------------------------------------------------------------------- Infini


def bench_infini(args) -> dict:
    from infini_transformer_pytorch import InfiniTransformer
    from infini_transformer_pytorch.infini_transformer import Memories

    every = "model.infini.layers=[0,1,2,3,4,5]"
    ours, ours_opts, _ = our_lm([every])
    rope, rope_opts, _ = our_lm([every, "model.position=rope"])
    torch.manual_seed(0)
    theirs = InfiniTransformer(num_tokens=VOCAB, dim=256, depth=6, dim_head=32, heads=8,
                               ff_mult=4, use_mem_delta_rule=True)
    their_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    state = {"mem": None}
    data = batches(args.warmup + args.steps, 4)

    def their_step(r: int) -> float:
        seq = data[r]
        t = time.perf_counter()
        logits, _, state["mem"] = theirs(seq[:, :-1], past_memories=state["mem"],
                                         return_new_memories=True)
        lm_loss(logits, seq[:, 1:]).backward()
        their_opt.step()
        their_opt.zero_grad(set_to_none=True)
        # truncate BPTT every segment, as ours; the package's own detach_memories=True and
        # detach_memories_() fail here (detach_() on None / on an einsum view), hence .detach()
        state["mem"] = [Memories(kv.detach(), norm.detach()) for kv, norm in state["mem"]]
        return time.perf_counter() - t

    names = ("memformers infini (t5)", "memformers infini (rope)", "infini-transformer-pytorch")
    times = interleaved({
        names[0]: lambda r: our_step(ours, ours_opts, data[r]),
        names[1]: lambda r: our_step(rope, rope_opts, data[r]),
        names[2]: their_step,
    }, args.warmup, args.steps, "infini")
    res = {name: summary(ts, B * L) for name, ts in times.items()}
    for name, m in zip(names, (ours, rope, theirs), strict=True):
        res[name]["params"] = n_params(m)
    tok = {n: r["tokens_per_s"] for n, r in res.items()}
    ratio = tok[names[0]] / tok[names[2]]
    return {"contenders": res,
            "ratios": {"infini_vs_peer": ratio,
                       "infini_rope_vs_peer": tok[names[1]] / tok[names[2]]},
            "pass": {"infini_vs_peer": ratio >= 1.5}}


# --------------------------------------------------------------------------- report


def table(results: dict) -> str:
    """Two markdown tables: every contender, then every target with its verdict."""
    rows = ["| bench | contender | params | median per step | train tok/s |",
            "|---|---|---:|---:|---:|"]
    for sec, res in results.items():
        for n, v in res["contenders"].items():
            if sec == "pkm":
                rows.append(f"| pkm 262K, fwd+bwd of (4, 512, 256) | {n} | "
                            f"{v['params'] / 1e6:.2f}M | {1e3 * v['median_s']:,.0f} ms | |")
            else:
                label = sec
                if sec == "knn":
                    label = f"knn, {res['fill']['capacity']:,} per stream"
                rows.append(f"| {label} | {n} | {v['params'] / 1e6:.2f}M | "
                            f"{v['median_s']:.2f} s | {v['tokens_per_s']:,.0f} |")
    rows += ["", "| target | measured | verdict |", "|---|---:|---|"]
    for res in results.values():
        for key, ok in res["pass"].items():
            rows.append(f"| {key}: {TARGETS[key]} | {res['ratios'][key]:.2f} | "
                        f"{'met' if ok else '**missed**'} |")
    extra = {"xl_vs_peer_no_knn": "memformers xl / package without its kNN layer, tok/s",
             "peer_knn_vs_peer_no_knn": "package / package without its kNN layer, tok/s",
             "pkm_sparse_vs_ffn": "memformers PKM sparse grads / FFN, time",
             "pkm_sparse_vs_peer": "memformers PKM sparse grads / package PKM, time",
             "infini_rope_vs_peer": "memformers infini with RoPE / package, tok/s"}
    for res in results.values():
        for key, val in res["ratios"].items():
            if key in extra:
                rows.append(f"| (context) {extra[key]} | {val:.2f} | |")
    return "\n".join(rows)


def header(setup: dict) -> str:
    return (f"torch {setup['versions']['torch']}, {setup['threads']} threads (faiss "
            f"{setup['faiss_threads']}), steps {setup['steps']} (+{setup['warmup']} warmup), "
            f"pkm reps {setup['pkm_reps']}, kNN fill {setup['fill']}, load "
            f"{setup['loadavg_start'][0]:.1f} -> {setup['loadavg_end'][0]:.1f}, "
            f"{setup['wall_s'] / 60:.1f} min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="knn,pkm,infini", help="comma-separated subset")
    ap.add_argument("--steps", type=int, default=5, help="timed repetitions per LM contender")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pkm-reps", type=int, default=7, help="timed repetitions for pkm")
    ap.add_argument("--capacity", type=int, default=65536, help="kNN tokens per stream")
    ap.add_argument("--fill", choices=("direct", "model"), default="direct")
    ap.add_argument("--knn-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra settings of our kNN model, e.g. model.knn.backend=\"faiss\"")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--out", default="benchmarks/results/peers.json")
    ap.add_argument("--report", metavar="JSON", help="only reprint the tables of a results file")
    args = ap.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(header(saved["setup"]))
        print(table(saved["results"]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
        try:  # the package's HNSW search and inserts run on faiss's own OpenMP threads
            import faiss
            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - {"knn", "pkm", "infini"}
    if unknown:
        ap.error(f"unknown --only entries: {sorted(unknown)}")
    if args.capacity % L:
        ap.error(f"--capacity must be a multiple of {L}")

    versions = {"torch": torch.__version__, "memformers": memformers.__file__}
    try:
        versions["memformers_commit"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        versions["memformers_commit"] = None
    try:
        import faiss
        faiss_threads = faiss.omp_get_max_threads()
    except ImportError:
        faiss_threads = None
    for p in PEERS + ("faiss-cpu", "einops"):
        try:
            versions[p] = version(p)
        except PackageNotFoundError:
            versions[p] = None
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    results: dict = {}
    for name in only:
        ts = time.perf_counter()
        results[name] = {"pkm": bench_pkm, "knn": bench_knn, "infini": bench_infini}[name](args)
        results[name]["seconds"] = time.perf_counter() - ts
        print(f"  [{name}] done in {results[name]['seconds']:.0f} s", file=sys.stderr,
              flush=True)
    wall = time.perf_counter() - t0
    setup = {"threads": torch.get_num_threads(), "faiss_threads": faiss_threads,
             "steps": args.steps, "warmup": args.warmup, "pkm_reps": args.pkm_reps,
             "fill": args.fill, "capacity": args.capacity, "batch": B, "segment": L,
             "versions": versions, "python": platform.python_version(),
             "machine": platform.machine(), "cpus": os.cpu_count(),
             "loadavg_start": load0, "loadavg_end": os.getloadavg(),
             "wall_s": wall, "argv": sys.argv[1:]}
    print(header(setup))
    print(table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "setup": setup,
        "targets": {k: v for k, v in TARGETS.items()
                    if any(k in r.get("pass", {}) for r in results.values())},
        "results": results,
    }, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else o))
    print(f"written {out}")


if __name__ == "__main__":
    main()
