"""Does a bigger memory help more? demo-base on documents longer than every memory size.

Builds corpora of long documents of kinds demo-base never saw (Perl modules and C headers,
one document per top-level directory), keeps the first ``--docs`` documents of at least
``--doc-tokens`` tokens, scores every token up to ``--doc-tokens`` of each, and evaluates
demo-base alone, + the kNN-LM, and + the training-free kNN memory of the README (layers
2-3, one softmax with the window), each at several memory sizes, with the same weights.
Prints a markdown table of the loss by position and writes it with every result as JSON.

    python scripts/long_memory_eval.py --out runs/long-memory          # ~1 h on 2 cores
    python scripts/long_memory_eval.py --out runs/lm-quick --corpora perl --docs 1 \\
        --doc-tokens 65536 --sizes 8192,65536 --variants base,knnlm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SOURCES = {  # name: (directory, include glob); one document per top-level directory
    "perl": (sorted(Path("/usr/share/perl").glob("5*")), "**/*.pm"),
    "cheaders": ([Path("/usr/include")], "**/*.h"),
}
# the kNN memory read by demo-base with no training (scripts/knnlm_eval.sh, README); its
# search: exact below 65,536 rows, faiss IVF from there (held-out loss +0.002%: BENCHMARKS.md)
KNN = ["model.knn.layers=[2,3]", "model.knn.normalize=[2]", "model.knn.combine=joint",
       "model.knn.gate_init=-3", "model.knn.backend=auto"]


def run(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    if code:
        sys.exit(f"failed ({code}): {' '.join(cmd)}; see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpora", default="perl,cheaders")
    ap.add_argument("--docs", type=int, default=2, help="documents per corpus")
    ap.add_argument("--doc-tokens", type=int, default=262144,
                    help="documents at least this long, scored up to it")
    ap.add_argument("--sizes", default="8192,65536,262144", help="memory sizes per stream")
    ap.add_argument("--variants", default="base,knnlm,knn",
                    help="base, knnlm, knn (the kNN memory) and both (kNN memory + kNN-LM)")
    ap.add_argument("--buckets", default="2048,8192,32768,65536,131072")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    (out / "tmp").mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in args.sizes.split(",")]
    results: dict = {"settings": vars(args), "corpora": {}}
    for name in args.corpora.split(","):
        dirs, glob = SOURCES[name]
        if not dirs or not dirs[0].is_dir():
            print(f"skipping {name}: no source directory on this machine")
            continue
        corpus = out / f"corpus-{name}"
        if not (corpus / "manifest.json").exists():
            run(["memformers", "data", "build", "--source", str(dirs[0]), "--include", glob,
                 "--group-by-package", "--split", "0,0,1", "--out", str(corpus), "--quiet"],
                out / f"build-{name}.log")
        common = ["--split", "test", "--max-docs", str(args.docs), "--no-progress",
                  "--set", f"data.corpus={corpus}", "--set", f"data.batch_size={args.docs}",
                  "--set", f"data.eval_min_doc_tokens={args.doc_tokens}",
                  "--set", f"data.eval_max_doc_tokens={args.doc_tokens}",
                  "--set", f"data.eval_buckets=[{args.buckets}]"]
        runs = []
        for variant in args.variants.split(","):
            if variant == "base":
                runs.append(("base", []))
            for size in sizes if variant != "base" else []:
                knnlm, knn = [f"model.knnlm.capacity={size}"], [*KNN, f"model.knn.capacity={size}"]
                sets = {"knnlm": knnlm, "knn": knn, "both": knn + knnlm}[variant]
                runs.append((f"{variant}-{size}", sets))
        rows = results["corpora"][name] = {}
        for label, sets in runs:
            path = out / f"{name}-{label}.json"
            if not path.exists():
                t0 = time.perf_counter()
                cmd = ["memformers", "eval", "demo-base", *common,
                       *[a for s in sets for a in ("--set", s)]]
                run(cmd, out / f"{name}-{label}.log", cwd=out / "tmp")
                (out / "tmp" / "eval-demo-base-test.json").rename(path)
                print(f"{name} {label}: {time.perf_counter() - t0:.0f} s", flush=True)
            rows[label] = json.loads(path.read_text())
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: dict) -> str:
    lines = []
    for name, rows in results["corpora"].items():
        if not rows:
            continue
        first = next(iter(rows.values()))
        buckets = list(first["by_position"])
        base = rows.get("base", {}).get("loss")
        lines += [f"\n{name}: {first['documents']} documents, {first['tokens']:,} tokens",
                  "| model | all | " + " | ".join(buckets) + " |",
                  "|---|---:|" + "---:|" * len(buckets)]
        for label, r in rows.items():
            rel = f" ({r['loss'] / base - 1:+.1%})" if base and label != "base" else ""
            cells = [f"{r['by_position'][b]['loss']:.4f}" for b in buckets]
            lines.append(f"| {label} | {r['loss']:.4f}{rel} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
