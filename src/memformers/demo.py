"""``memformers demo``: the README's main job, on a fresh machine, on 2 CPU cores.

1. builds the default corpora: the standard library grouped into one long
   document per package (held-out packages for evaluation) and a small corpus
   of passkey documents (<= 2K tokens) to fine-tune on;
2. runs the ``cpu-small`` compare preset: the shipped base model fine-tuned with
   and without a kNN memory, same data, steps and seed;
3. prints the table and the two things memory is for: lower loss late in long
   documents (memory on vs off for the same weights) and passkey retrieval far
   beyond the attention window (segment + XL cache = 512 tokens), then every memory
   on the same held-out tokens: the shipped base alone, with the training-free kNN-LM,
   with the kNN memory and no training, and with both; the XL control; the kNN model
   with its memory off and on, and both with the kNN-LM added, each with a bootstrap
   interval over documents;
4. runs the shipped ``passkey-knn`` model (the same base, taught on GPU to use its
   kNN memory with passkey prompts of <= 4K tokens) with its memory on and off:
   the key is retrieved from far beyond the window only with the memory.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from memformers.errors import MemformersError

GROUPED = Path("data/stdlib-byte-grouped")
PASSKEY = Path("data/passkey-demo")
QUICK = ["train.steps=40", "train.ckpt_every=20"]
CONTROL = "xl (fine-tuned control)"  # the memory ladder's row the target compares with
QUICK_EVAL = {"max_tokens": 8000, "passkey_lengths": [2048], "passkey_samples": 2,
              "passkey_depths": [0.5]}
# the shipped passkey model: (lengths, depths, samples per cell)
PASSKEY_GRID = ([2048, 8192], [0.25, 0.75], 2)
QUICK_PASSKEY_GRID = ([2048], [0.5], 2)


def find_preset(name: str = "cpu-small") -> Path:
    """configs/compare/<name>.toml in the working directory, else the one in the package."""
    for root in (Path.cwd(), Path(__file__).resolve().parent):
        path = root / "configs" / "compare" / f"{name}.toml"
        if path.is_file():
            return path
    raise MemformersError(f"cannot find configs/compare/{name}.toml (the package's copy is "
                          "missing: reinstall memformers)")


def ensure_corpora(progress: bool) -> None:
    from memformers.data.corpus import build_corpus
    from memformers.tasks.passkey import build_passkey_corpus

    if not (GROUPED / "manifest.json").is_file():
        print(f"building {GROUPED} (standard library, one document per package)", flush=True)
        build_corpus(GROUPED, "stdlib", group=True, split=(0.8, 0.1, 0.1), progress=progress)
    if not (PASSKEY / "manifest.json").is_file():
        print(f"building {PASSKEY} (passkey documents to fine-tune on)", flush=True)
        build_passkey_corpus(PASSKEY, 600, 300, 2048, seed=0)


def headline(results: dict) -> list[str]:
    """The demo's two claims, read off the results (whatever they are)."""
    lines = []
    runs = {v["name"]: v for v in results["variants"]}
    knn, xl = runs.get("xl+knn", {}), runs.get("xl", {})
    sweep = [p for p in knn.get("memory_sweep") or [] if "loss" in p]
    if len(sweep) >= 2:
        off, on = sweep[0], sweep[-1]
        for bucket in on.get("by_position", {}):
            a = off["by_position"].get(bucket, {}).get("loss")
            b = on["by_position"][bucket]["loss"]
            if a:
                lines.append(f"  tokens {bucket:>8} into a document: loss {a:.4f} with memory "
                             f"off -> {b:.4f} with {on['capacity']} entries "
                             f"({100 * (b - a) / a:+.1f}%)")
    for name, run in (("xl", xl), ("xl+knn", knn)):
        pk = run.get("passkey")
        if pk:
            accs = ", ".join(f"{n} tokens {100 * sum(row) / len(row):.0f}%"
                             for n, row in zip(pk["lengths"], pk["accuracy"]))
            lines.append(f"  passkey retrieval, {name:>6}: {accs}")
    return lines


KNNLM = "model.knnlm.capacity=65536"


def evaluate_source(source: str, sets: list[str], split: str | None = None,
                    device: str = "auto", **kw) -> dict:
    """``evaluate_lm`` of a run directory or shipped model (``source``) with ``--set``
    items ``sets``, on ``split`` of its corpus (default: its eval split); ``kw``: the
    evaluation's settings (batch_size, max_docs, max_doc_tokens, buckets, ...)."""
    from memformers.cli import load_trained_model
    from memformers.data.corpus import CorpusSplit
    from memformers.evaluate.lm import evaluate_lm

    cfg, model, tok = load_trained_model(source, sets, device)
    data = CorpusSplit.open(Path(cfg.data.corpus), split or cfg.data.eval_split)
    return evaluate_lm(model, data, tok.token_bytes, segment_len=cfg.data.segment_len, **kw)


def memory_ladder(results: dict, cc, progress: bool) -> list[dict]:
    """Every way to add memory, on the same held-out tokens: the shipped base alone, with
    the training-free kNN-LM, with the kNN memory of the "xl+knn" variant's settings and no
    training, and with both; the fine-tuned XL control with and without the kNN-LM; and
    the fine-tuned kNN model with its memory off, on, and on + the kNN-LM. Each row has
    the loss by position and its change against the base with a 95% bootstrap interval
    over documents, and (``late_vs_control``) the change beyond 2K tokens against the XL
    control, the comparison of the issue's target."""
    from memformers.evaluate.lm import bootstrap_change

    spec = cc.eval
    runs = {v["name"]: v["run_dir"] for v in results["variants"]}
    knn = [s for v in cc.variants if v.name == "xl+knn" for s in v.set
           if s.startswith("model.knn.")]
    ladder = [("demo-base (no fine-tune)", "demo-base", []),
              ("demo-base + kNN-LM (no training)", "demo-base", [KNNLM])]
    if knn:
        ladder += [("demo-base + kNN memory (no training)", "demo-base", knn),
                   ("demo-base + both (no training)", "demo-base", [*knn, KNNLM])]
    if "xl" in runs:
        ladder += [(CONTROL, runs["xl"], []),
                   ("xl + kNN-LM", runs["xl"], [KNNLM])]
    if "xl+knn" in runs:
        ladder += [("xl+knn, memory off", runs["xl+knn"], ["model.knn.capacity=0"]),
                   ("xl+knn, memory on", runs["xl+knn"], []),
                   ("xl+knn + kNN-LM", runs["xl+knn"], [KNNLM])]
    rows, base = [], None
    for label, source, sets in ladder:
        ev = evaluate_source(source, [*sets, "data.batch_size=4"], spec.split, "cpu",
                             batch_size=4, max_docs=spec.max_docs, max_tokens=spec.max_tokens,
                             progress=progress)
        base = base or ev
        rows.append({"name": label, "eval": ev, "change": bootstrap_change(base, ev)})
    control = next((r["eval"] for r in rows if r["name"] == CONTROL), None)
    for r in rows:
        r["late_vs_control"] = (bootstrap_change(control, r["eval"], late=True)
                                if control is not None and r["eval"] is not control else None)
    return rows


def format_ladder(rows: list[dict]) -> list[str]:
    buckets = list(rows[0]["eval"]["by_position"]) if rows else []
    def interval(change) -> str:
        c, lo, hi = change
        return f"{100 * c:+.1f}% [{100 * lo:+.1f}, {100 * hi:+.1f}]"

    lines = [f"  {'model':<38}{'loss':>8}" + "".join(f"{b:>9}" for b in buckets)
             + f"   {'vs demo-base':<22}   beyond 2K vs the XL control (95% intervals over "
               "documents)"]
    for r in rows:
        ev = r["eval"]
        by = "".join(f"{ev['by_position'].get(b, {}).get('loss', float('nan')):>9.4f}"
                     for b in buckets)
        vs = "" if r is rows[0] else interval(r["change"])
        late = r.get("late_vs_control")
        lines.append(f"  {r['name']:<38}{ev['loss']:>8.4f}{by}   {vs:<22}"
                     + (f"   {interval(late)}" if late else ""))
    n = rows[0]["eval"] if rows else {}
    lines.append(f"  ({n.get('tokens', 0):,} tokens of {n.get('documents', 0)} held-out "
                 f"documents, the compare table's)")
    return lines


def shipped_passkey(quick: bool, progress: bool) -> dict:
    """Passkey accuracy of the shipped ``passkey-knn`` model, memory on and off."""
    from memformers.data.tokenizer import ByteTokenizer
    from memformers.evaluate.passkey import evaluate_passkey
    from memformers.pretrained import load_shipped_model

    lengths, depths, samples = QUICK_PASSKEY_GRID if quick else PASSKEY_GRID
    out = {}
    for name, capacity in (("memory on", 65536), ("memory off", 0)):
        cfg, model = load_shipped_model("passkey-knn", [f"model.knn.capacity={capacity}"])
        out[name] = evaluate_passkey(model, ByteTokenizer(), lengths, depths,
                                     segment_len=cfg.data.segment_len, samples_per_cell=samples,
                                     seed=2026, progress=progress)
    return out


def run_demo(quick: bool = False, out: str | None = None, progress: bool = True) -> int:
    from memformers.compare.harness import run_compare
    from memformers.compare.report import print_table, write_report
    from memformers.compare.spec import load_compare_config

    t0 = time.time()
    ensure_corpora(progress)
    cc = load_compare_config(find_preset(), QUICK if quick else [], None)
    if quick:
        for k, v in QUICK_EVAL.items():
            setattr(cc.eval, k, v)
    out_dir = Path(out or ("reports/demo-quick" if quick else "reports/demo"))
    results = run_compare(cc, out_dir, progress=progress)
    report = write_report(results, out_dir)
    print()
    print(print_table(results))
    print("\nwhat memory did (same weights, memory off vs on; passkey far beyond the "
          "512-token attention window):")
    print("\n".join(headline(results)) or "  (no memory results)")
    print("\nevery memory on the same held-out tokens, the training-free kNN-LM "
          "(model.knnlm, 65K entries) included:", flush=True)
    ladder = memory_ladder(results, cc, progress)
    print("\n".join(format_ladder(ladder)))
    (out_dir / "memory_ladder.json").write_text(json.dumps(
        [{**r, "eval": {k: v for k, v in r["eval"].items()
                        if k not in ("by_doc", "by_doc_late")}}
         for r in ladder], indent=2))
    print("\nthe shipped passkey-knn model (the same base taught on GPU to use its memory, "
          "prompts <= 4K tokens), same weights with the kNN memory on and off:", flush=True)
    for name, r in shipped_passkey(quick, progress).items():
        accs = ", ".join(f"{n} tokens {100 * sum(row) / len(row):.0f}%"
                         for n, row in zip(r["lengths"], r["accuracy"]))
        print(f"  passkey retrieval, {name:>10}: {accs}  "
              f"({r['seconds_per_sample']:.1f} s per prompt)")
    print(f"\nreport: {report}   ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
