"""The learned kNN memory against its XL control, on the issue's protocol: every held-out
document of a split, every token up to ``--doc-tokens`` of each.

Given the two runs of a compare (the XL control and XL + kNN memory, fine-tuned
identically), this evaluates on each split:
- demo-base alone, and with the same kNN memory and no training;
- the XL control;
- the XL + kNN model with its memory off (capacity 0: the same weights, local attention
  only) and on.

``--corpus DIR`` scores another corpus's splits instead of the runs' own (e.g. the
never-seen Perl and C headers of ``scripts/unseen_corpora.sh``, whose documents are all in
``test``), for the issue's check that the gains hold beyond Python source.

``--knnlm`` adds the training-free kNN-LM (65K entries) to demo-base, to the control and
to the memory model, for the target "kNN memory + kNN-LM better than either alone".

It prints the loss by position and the change beyond the first bucket (2K tokens) against
the control and against demo-base, with 95% bootstrap intervals over documents
(``evaluate.lm.bootstrap_change``). It writes every result to ``--out``. Rerun with the
same runs and ``--out``, it evaluates only the models not already there. ``--reuse
EARLIER.json`` takes the demo-base rows (which depend on neither run) from an earlier
record of the same memory settings, corpus and document length, instead of recomputing
them for every new pair of runs.

    python scripts/learned_memory_eval.py \\
        --control reports/cpu-small-s14/runs/xl-* --memory reports/cpu-small-s14/runs/xl+knn-* \\
        --out benchmarks/results/learned_memory/cpu-small-s14.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from memformers.demo import KNNLM, evaluate_source
from memformers.errors import MemformersError
from memformers.evaluate.lm import bootstrap_change


def change(base: dict, other: dict, late: bool) -> str:
    c, lo, hi = bootstrap_change(base, other, late=late)
    return f"{c:+.1%} [{lo:+.1%}, {hi:+.1%}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--control", required=True, help="the XL control's run directory")
    ap.add_argument("--memory", required=True, help="the XL + kNN memory run directory")
    ap.add_argument("--corpus", help="a corpus directory to score instead of the runs' own")
    ap.add_argument("--splits", default="test,valid")
    ap.add_argument("--doc-tokens", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=4, help="document streams at a time")
    ap.add_argument("--knnlm", action="store_true", help="also every model + the kNN-LM")
    ap.add_argument("--reuse", help="an earlier --out whose demo-base rows to take")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    configs = {}
    for flag, run in (("--control", args.control), ("--memory", args.memory)):
        try:  # both checked before any evaluation
            configs[flag] = json.loads((Path(run) / "config.json").read_text())
        except (OSError, ValueError) as e:
            fail(f"{flag} {run}: not a memformers run directory ({e.__class__.__name__})")
    if args.corpus and not (Path(args.corpus) / "manifest.json").is_file():
        fail(f"--corpus {args.corpus}: not a memformers corpus (no manifest.json)")
    trained = configs["--memory"]
    knn = trained["model"]["knn"]
    knn_sets = [f"model.knn.{k}={json.dumps(knn[k])}"
                for k in ("layers", "capacity", "normalize", "combine", "gate_init", "top_k")
                if k in knn]
    models = {"demo-base": ("demo-base", []),
              "demo-base + kNN memory, no training": ("demo-base", knn_sets),
              "XL control": (args.control, []),
              "XL + kNN, memory off": (args.memory, ["model.knn.capacity=0"]),
              "XL + kNN, memory on": (args.memory, [])}
    if args.knnlm:
        models.update({"demo-base + kNN-LM": ("demo-base", [KNNLM]),
                       "XL control + kNN-LM": (args.control, [KNNLM]),
                       "XL + kNN, memory on, + kNN-LM": (args.memory, [KNNLM])})
    if args.corpus:  # every model reads the same other corpus
        models = {name: (run, [*sets, f"data.corpus={args.corpus}"])
                  for name, (run, sets) in models.items()}
    out = Path(args.out)
    record = {"control": args.control, "memory": args.memory, "knn": knn_sets,
              "corpus": args.corpus, "doc_tokens": args.doc_tokens, "splits": {}}
    if out.is_file():  # resume: keep the rows an earlier run of the same models wrote
        old = json.loads(out.read_text())
        if scored_alike(old, record, ("control", "memory", "corpus", "doc_tokens")):
            record["splits"] = old["splits"]
            if "reused" in old:  # where its base rows came from
                record["reused"] = old["reused"]
    splits = args.splits.split(",")
    if args.reuse:
        reuse_base_rows(record, args.reuse, splits,
                        [n for n, (run, _) in models.items() if run == "demo-base"])
    for split in splits:
        rows = record["splits"].setdefault(split, {})
        for name, (run, sets) in models.items():
            if name in rows:
                continue
            t0 = time.perf_counter()
            rows[name] = evaluate_source(run, sets, split, batch_size=args.batch,
                                         max_doc_tokens=args.doc_tokens, progress=False)
            print(f"[{split}] {name}: {rows[name]['loss']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))
    print(table(record))


def reuse_base_rows(record: dict, path: str, splits: list[str], names: list[str]) -> None:
    """Copy into ``record`` the rows ``names`` (models that read neither run) of
    ``splits`` from the earlier record at ``path``, which must have scored the same memory
    settings, corpus and document length; rows ``record`` already has are kept."""
    try:  # a record from before --corpus has no "corpus": it scored the runs' own
        old = json.loads(Path(path).read_text())
        same = scored_alike(old, record, ("knn", "corpus", "doc_tokens"))
        earlier = {split: dict(old["splits"].get(split, {})) for split in splits} if same else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        fail(f"--reuse {path}: not a learned_memory_eval record ({e.__class__.__name__})")
    if not same:
        fail(f"--reuse {path}: scored other memory settings, corpus or document length")
    for split, rows in earlier.items():
        kept = record["splits"].setdefault(split, {})
        for name in names:
            if name in rows and name not in kept:
                kept[name] = rows[name]
    record["reused"] = path


def scored_alike(old: dict, record: dict, keys: tuple[str, ...]) -> bool:
    """Whether an earlier record ``old`` has the same ``keys`` as ``record`` (a key it
    lacks counts as None)."""
    return all(old.get(k) == record[k] for k in keys)


def table(record: dict) -> str:
    """Each split's rows: the loss by position and beyond 2K, and the change beyond 2K
    against the XL control, demo-base and (with --knnlm) demo-base + kNN-LM."""
    lines = []
    for split, rows in record["splits"].items():
        first = rows["demo-base"]
        names = list(first["by_position"])
        refs = [r for r in ("XL control", "demo-base", "demo-base + kNN-LM") if r in rows]
        lines += [f"\n{split}: {first['documents']} documents, {first['tokens']:,} tokens "
                  f"(every token up to {record['doc_tokens']:,} per document)",
                  "| model | all | " + " | ".join(names) + " | beyond 2K | "
                  + " | ".join(f"vs {ref}" for ref in refs) + " |",
                  "|---|---:|" + "---:|" * (len(names) + 1 + len(refs))]
        for name, r in rows.items():
            late = r["by_doc_late"]["docs"]
            nll, n = sum(v[0] for v in late.values()), sum(v[1] for v in late.values())
            cells = [f"{r['by_position'][b]['loss']:.4f}" for b in names]
            cells.append(f"{nll / n if n else float('nan'):.4f}")
            cells += [change(rows[ref], r, True) if name != ref else "" for ref in refs]
            lines.append(f"| {name} | {r['loss']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    try:
        main()
    except MemformersError as e:  # e.g. a run's corpus is missing
        fail(str(e))
