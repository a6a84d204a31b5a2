"""The ``memformers`` command line.

    memformers data build [--source stdlib|DIR|FILE.jsonl] --out DIR
    memformers train --config FILE [--set key=value ...] [--run-dir DIR] [--resume]
                     [--nproc N]      (N processes through torchrun: DDP / FSDP2)
    memformers eval RUN_DIR [--split valid|test] [--max-docs N] [--memory-sweep N,N
                    [--memory-sweep-xl on,off]] [--passkey-lengths N,N] [--out DIR]
    memformers generate RUN_DIR --prompt TEXT [--tokens N]
    memformers knnlm-tune RUN_DIR [--split valid]   (the kNN-LM's lambda and temperature)
    memformers diagnose pkm-bn RUN_DIR   (PKM query BatchNorm: running vs per-batch statistics)
    (RUN_DIR may be a shipped model name: demo-base, passkey-knn)
    memformers compare CONFIG            (train + evaluate variants on equal terms)
    memformers sorting --config FILE --lengths 1024,2048 [--steps N] [--samples M]
                                         (the infinity-former's sorting task, one model)
    memformers finetune --hf-model DIR   (a Hugging Face model with retrofitted memory)
    memformers memorize / ask            (a text into a model's memory; answer from it)
    memformers demo [--quick]            (the main job: see README)

Every user error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from memformers.errors import MemformersError


def _load_run_config(run_dir: Path, overrides: list[str]):
    from memformers.config import apply_overrides, config_from_dict

    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        raise MemformersError(f"not a memformers run directory: {run_dir} (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MemformersError(f"{cfg_file} is not valid JSON ({e}); restore it from a copy "
                              f"or start a new run") from None
    if not isinstance(raw, dict):
        raise MemformersError(f"{cfg_file} does not hold a run config (a JSON object)")
    return config_from_dict(apply_overrides(raw, overrides))


def is_shipped(run_dir: str | Path) -> bool:
    """A shipped model name (``demo-base``, ...) given where a run directory goes."""
    from memformers.pretrained import SHIPPED

    return str(run_dir) in SHIPPED and not Path(run_dir).exists()


def load_trained_model(run_dir: str | Path, overrides: list[str] = (), device: str = "auto",
                       need_corpus: bool = True):
    """(config, model, tokenizer) of a finished or checkpointed run, or of shipped weights
    named like ``demo-base`` (their record's config; its corpus for the tokenizer)."""
    from memformers.data.tokenizer import ByteTokenizer, load_tokenizer
    from memformers.model import build_model
    from memformers.pretrained import shipped_config, shipped_weights, untrained_tensors
    from memformers.train.checkpoint import latest_checkpoint, load_model_weights
    from memformers.train.trainer import resolve_device

    run_dir = Path(run_dir)
    if is_shipped(run_dir):
        cfg = shipped_config(str(run_dir), list(overrides))
        weights = shipped_weights(str(run_dir))
        corpus = Path(cfg.data.corpus)
        # the shipped models are byte-level: without their corpus, the byte tokenizer
        tokenizer = load_tokenizer(corpus) if need_corpus or corpus.is_dir() else ByteTokenizer()
        model = build_model(cfg.model, tokenizer).to(resolve_device(device))
        # the record's "untrained" tensors (e.g. a never-used gate) and tensors of layers the
        # --set items add take the config's init (e.g. model.knn.gate_init), as init_from does
        missing = load_model_weights(model, weights, strict=False,
                                     skip=untrained_tensors(str(run_dir)))
        new = sorted(set(missing) - untrained_tensors(str(run_dir)))
        if new:
            print(f"{run_dir}: parameters at their init (not in the shipped weights): "
                  f"{', '.join(new)}", file=sys.stderr)
        return cfg, model.eval(), tokenizer
    cfg = _load_run_config(run_dir, list(overrides))
    tokenizer = load_tokenizer(Path(cfg.data.corpus))
    check_run_tokenizer(run_dir, cfg, tokenizer)
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise MemformersError(f"{run_dir} has no model.safetensors and no complete checkpoint")
        weights = ckpt / "model.safetensors"
    model = build_model(cfg.model, tokenizer).to(resolve_device(device))
    load_model_weights(model, weights)
    return cfg, model.eval(), tokenizer


def check_run_tokenizer(run_dir: Path, cfg, tokenizer) -> None:
    """The corpus (``data.corpus``) must use the tokenizer the run was trained with."""
    corpus_tok = Path(cfg.data.corpus) / "tokenizer.json"
    run_tok = run_dir / "tokenizer.json"
    same_file = not run_tok.is_file() or (
        corpus_tok.is_file() and corpus_tok.read_bytes() == run_tok.read_bytes())
    if cfg.model.hf_path:
        return  # checked against the Hugging Face model's own vocabulary (hf.lm)
    if tokenizer.vocab_size != cfg.model.vocab_size or not same_file:
        raise MemformersError(f"corpus {cfg.data.corpus} uses another tokenizer (vocabulary "
                              f"{tokenizer.vocab_size}) than the run {run_dir} (vocabulary "
                              f"{cfg.model.vocab_size}); evaluate on a corpus built with the "
                              f"run's tokenizer")


def launch_processes(nproc: int, args) -> int:
    """``memformers train ...`` in ``nproc`` processes via torchrun's own entry point."""
    if nproc < 1:
        raise MemformersError(f"--nproc must be at least 1, got {nproc}")
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from memformers.train.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise MemformersError("--nproc inside torchrun: use one or the other")
    argv = ["train", "--run-dir", args.run_dir]
    if args.config:
        argv += ["--config", args.config]
    for item in args.set:
        argv += ["--set", item]
    argv += ["--resume"] * args.resume + ["--no-progress"] * args.no_progress
    try:
        torchrun.main(["--standalone", f"--nproc_per_node={nproc}", "-m", "memformers", *argv])
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
        print("error: training process(es) failed: " + ", ".join(
            f"rank {r} (exit code {c})" for r, c in sorted(codes.items())), file=sys.stderr)
        return 2 if set(codes.values()) == {2} else 1
    except SignalException as e:  # passed on to the processes: on SIGTERM they checkpoint
        print(f"launcher stopped by signal {int(e.sigval)}", file=sys.stderr)
        return 0 if e.sigval == signal.SIGTERM else 128 + int(e.sigval)
    return 0


def cmd_train(args) -> int:
    from memformers.config import load_config

    if args.task:  # before the --set items, which may still change it
        args.set = [f"task.name={args.task}", *args.set]
        args.task = None
    if args.nproc is not None:
        return launch_processes(args.nproc, args)
    run_dir = Path(args.run_dir)
    if args.resume and args.config is None:
        cfg = _load_run_config(run_dir, args.set)
    else:  # no --config: the defaults (the baseline preset), changed by --set
        cfg = load_config(args.config, args.set)
    return run_training(cfg, run_dir, args.resume, not args.no_progress)


def run_training(cfg, run_dir: Path, resume: bool, progress: bool) -> int:
    """Train (or resume) a run, evaluate it, write eval.json (``train`` and ``finetune``).

    With several processes (torchrun) only rank 0 prints and writes.
    """
    from memformers.train.trainer import Trainer

    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress)
    main = trainer.dist.is_main
    finished = False
    try:
        if main:
            print(trainer.describe(), flush=True)
        result = trainer.run()
        if "stopped_at" in result:
            if main:
                print(f"stopped at step {result['stopped_at']}; checkpoint saved, continue "
                      "with --resume")
        else:
            ev = trainer.evaluate()
            if main:
                trainer.task.write_result(ev, run_dir)
                print(trainer.task.format_result(ev))
                print(f"run saved in {run_dir}")
        finished = True
        return 0
    finally:
        trainer.close(finished)


# ``memformers eval`` options that are lists, with the type of their items; every eval option
# is named after its key in a compare config's [eval] table (--memory-sweep: memory_sweep)
EVAL_LIST_OPTIONS = {"memory_sweep": int, "memory_sweep_xl": str, "loss_diff_capacities": int,
                     "passkey_lengths": int, "passkey_depths": float}
EVAL_NUMBER_OPTIONS = ("max_docs", "max_tokens", "loss_diff_doc", "winners", "passkey_samples")


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def eval_spec_from_args(args):
    """The ``[eval]`` settings (``EvalSpec``) the options of ``memformers eval`` ask for,
    checked exactly as ``memformers compare`` checks its ``[eval]`` table."""
    from memformers.compare.spec import eval_spec_from_dict

    raw: dict = {"split": args.split}
    for key, kind in EVAL_LIST_OPTIONS.items():
        text = getattr(args, key)
        if text is not None:
            try:
                raw[key] = [kind(x.strip()) for x in text.split(",") if x.strip()]
            except ValueError:
                raise MemformersError(f"{_option(key)}: expected a comma-separated list of "
                                      f"{kind.__name__} values, got '{text}'") from None
    for key in EVAL_NUMBER_OPTIONS:
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    return eval_spec_from_dict(raw, name=_option)


def cmd_eval(args) -> int:
    from memformers.compare.evaluation import check_passkey_lengths, evaluate_model
    from memformers.compare.harness import eval_results
    from memformers.compare.report import extra_sections, loss_difference, write_report
    from memformers.evaluate.lm import format_eval

    run_dir = Path(args.run_dir)
    spec = eval_spec_from_args(args)
    cfg, model, tok = load_trained_model(run_dir, args.set, args.device)
    if spec.memory_sweep and not cfg.model.knn.layers:
        raise MemformersError("--memory-sweep needs a model with kNN memory layers "
                              "(model.knn.layers is empty)")
    check_passkey_lengths(tok, spec.passkey_lengths, "--passkey-lengths")
    parts = evaluate_model(lambda: model, cfg, tok, spec, device=next(model.parameters()).device,
                           progress=not args.no_progress)
    results = eval_results(run_dir, cfg, spec, parts)
    print(format_eval(parts["eval"]))
    for section in extra_sections(results, loss_difference(results), plots={}):
        print("\n" + section.rstrip())
    if args.out:
        report = write_report(results, args.out)
        print(f"\nreport written to {report}")
    else:
        out = (Path(f"eval-{run_dir}-{args.split}.json") if is_shipped(run_dir)  # no run dir
               else run_dir / f"eval-{args.split}.json")
        lm = {k: v for k, v in parts["eval"].items() if k != "doc_losses"}
        out.write_text(json.dumps(lm, indent=2))
        print(f"written {out}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from memformers.evaluate.generate import feed_and_generate

    if args.tokens < 1:
        raise MemformersError(f"--tokens must be >= 1, got {args.tokens}")
    if args.top_k < 0:
        raise MemformersError(f"--top-k must be >= 0, got {args.top_k}")
    cfg, model, tok = load_trained_model(Path(args.run_dir), args.set, args.device,
                                         need_corpus=False)
    if not args.prompt:
        raise MemformersError("--prompt must not be empty")
    torch.manual_seed(args.seed)
    ids = torch.tensor([tok.encode(args.prompt)], device=next(model.parameters()).device)
    with torch.no_grad():
        out = feed_and_generate(model, ids, args.tokens, cfg.data.segment_len,
                                temperature=args.temperature, top_k=args.top_k)
    print(args.prompt + tok.decode(out[0].tolist()))
    return 0


def cmd_knnlm_tune(args) -> int:
    from memformers.data.corpus import CorpusSplit
    from memformers.evaluate.knnlm_tune import format_tune, record_neighbours, tune
    from memformers.train.checkpoint import atomic_write_text

    run_dir = Path(args.run_dir)
    overrides = list(args.set)
    if not any(s.startswith("model.knnlm.capacity=") for s in overrides):
        overrides.append("model.knnlm.capacity=65536")
    cfg, model, _ = load_trained_model(run_dir, overrides, args.device)
    out = Path(args.out) if args.out else (
        Path(f"knnlm-{run_dir}.json") if is_shipped(run_dir) else run_dir / "knnlm.json")
    try:  # before the long recording: a record that cannot be written fails now
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MemformersError(f"--out {out}: cannot create {out.parent} ({e.strerror})") from None
    d = cfg.data
    split = CorpusSplit.open(Path(d.corpus), args.split)
    rec = record_neighbours(model, split, batch_size=d.batch_size, segment_len=d.segment_len,
                            max_docs=args.max_docs, max_tokens=args.max_tokens,
                            max_doc_tokens=d.eval_max_doc_tokens,
                            min_doc_tokens=d.eval_min_doc_tokens, progress=not args.no_progress)
    result = {"split": args.split, "settings": overrides, **tune(rec)}
    print(format_tune(result))
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"written {out}")
    return 0


def parse_lengths(text: str) -> list[int]:
    """``"1024,2048"`` -> [1024, 2048]; anything else is a one-line error."""
    try:
        lengths = [int(x) for x in text.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) <= 0:
        raise MemformersError(f"--lengths must be positive integers separated by commas, "
                              f"got '{text}'")
    return lengths


def format_sorting(results: dict[str, dict]) -> str:
    """length / accuracy / loss / train seconds, one row per length."""
    lines = [f"{'length':>8}  {'accuracy':>8}  {'loss':>7}  {'train s':>8}"]
    for r in results.values():
        lines.append(f"{r['length']:>8}  {r['accuracy']:>8.1%}  {r['loss']:>7.4f}  "
                     f"{r['train_seconds']:>8.1f}")
    return "\n".join(lines)


def cmd_sorting(args) -> int:
    from memformers.compare.plots import plot_sorting, plot_sorting_curves
    from memformers.config import load_config, to_dict
    from memformers.tasks.sorting import train_eval_sorting
    from memformers.train.checkpoint import atomic_write_text
    from memformers.train.trainer import autocast_for, resolve_device

    lengths = parse_lengths(args.lengths)
    if args.steps < 1 or args.samples < 1:
        raise MemformersError(f"--steps and --samples must be >= 1, got {args.steps} and "
                              f"{args.samples}")
    if args.eval_every < 0:
        raise MemformersError(f"--eval-every must be >= 0, got {args.eval_every}")
    cfg = load_config(args.config, args.set)
    if cfg.model.hf_path:
        raise MemformersError("the sorting task trains a memformers model from scratch; "
                              "model.hf_path is not supported")
    out = Path(args.out) if args.out else Path("reports") / f"sorting-{Path(args.config).stem}"
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    autocast = autocast_for(device, cfg.train.precision)
    record = {"config_file": args.config, "set": args.set, "config": to_dict(cfg),
              "steps": args.steps, "samples": args.samples, "sorting": {}}
    def write() -> None:  # after every length and curve point: a long run keeps what it did
        atomic_write_text(out / "results.json", json.dumps(record, indent=1))

    for t in lengths:
        def partial(curve: list[dict], t: int = t) -> None:  # the length in progress
            record["in_progress"] = {"length": t, "curve": curve}
            write()

        record["sorting"][str(t)] = train_eval_sorting(
            cfg, t, args.steps, args.samples, device, autocast, not args.no_progress,
            eval_every=args.eval_every, on_curve=partial)
        record.pop("in_progress", None)
        write()
    plotted = {"variants": [{"name": Path(args.config).stem, "sorting": record["sorting"]}]}
    plot_sorting(plotted, out / "sorting.png")
    plot_sorting_curves(plotted, out / "sorting_curves.png")  # with --eval-every
    print(format_sorting(record["sorting"]))
    print(f"results written to {out / 'results.json'} and {out / 'sorting.png'}")
    return 0


def cmd_demo(args) -> int:
    import os

    from memformers.demo import run_demo

    if args.workdir:  # data/, reports/ and runs are written under it
        try:
            Path(args.workdir).mkdir(parents=True, exist_ok=True)
            os.chdir(args.workdir)
        except OSError as e:
            raise MemformersError(f"--workdir {args.workdir}: {e.strerror or e}") from None
    return run_demo(quick=args.quick, out=args.out, progress=not args.no_progress)


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one line (``error: ...; see PROG --help``), exit 2."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="memformers", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model")
    t.add_argument("--config", help="TOML config (see configs/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.knn.layers=[4]")
    t.add_argument("--run-dir", default="runs/default")
    t.add_argument("--task", choices=["lm", "passkey"],
                   help="what to train on (sets task.name): lm = the corpus's documents "
                        "(default), passkey = passkey prompts with the loss on the answer")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--nproc", type=int, metavar="N",
                   help="train in N processes (torchrun on this machine: one per GPU, or "
                        "gloo on CPU); data.batch_size is the total number of streams")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run on held-out documents",
                       description="Held-out loss by position in document, and optionally the "
                                   "evaluations of `memformers compare` (options named after "
                                   "its [eval] keys).")
    e.add_argument("run_dir")
    e.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    e.add_argument("--max-docs", type=int, help="held-out documents (0 = all)")
    e.add_argument("--max-tokens", type=int, help="stop after this many tokens (0 = no limit)")
    e.add_argument("--memory-sweep", "--sweep", dest="memory_sweep", metavar="N,N,...",
                   help="kNN capacities to evaluate the same weights with, e.g. "
                        "0,1536,8192,65536,262144")
    e.add_argument("--memory-sweep-xl", "--sweep-xl", dest="memory_sweep_xl", metavar="on,off",
                   help="sweep with the XL cache on, off or both (default: as trained)")
    e.add_argument("--loss-diff-capacities", metavar="A,B",
                   help="per-token loss difference between these two sweep capacities "
                        "(default: the smallest and the largest)")
    e.add_argument("--loss-diff-doc", type=int,
                   help="held-out document of the loss difference (default: the longest)")
    e.add_argument("--winners", type=int, help="tokens listed where B gains most (default 10)")
    e.add_argument("--passkey-lengths", metavar="N,N,...", help="passkey context lengths")
    e.add_argument("--passkey-depths", metavar="D,D,...",
                   help="needle depths in [0, 1] (default 0,0.5,1)")
    e.add_argument("--passkey-samples", type=int, help="prompts per cell (default 4)")
    e.add_argument("--device", default="auto")
    e.add_argument("--out", metavar="DIR",
                   help="write report.md, results.json and PNG plots here (default: only "
                        "RUN_DIR/eval-SPLIT.json)")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="evaluate with changed settings, e.g. --set model.knn.capacity=8192")
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("knnlm-tune", help="choose the kNN-LM's lambda and temperature",
                       description="Stream held-out documents once, then score a grid of "
                                   "kNN-LM lambdas and temperatures; prints the best and "
                                   "writes RUN_DIR/knnlm.json (knnlm-NAME.json for a shipped "
                                   "model).")
    t.add_argument("run_dir", help="a run directory or a shipped model (demo-base)")
    t.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    t.add_argument("--max-docs", type=int, default=0, help="documents (0 = all)")
    t.add_argument("--max-tokens", type=int, default=0, help="stop after N tokens (0 = all)")
    t.add_argument("--out", help="the JSON record (default: see above)")
    t.add_argument("--device", default="auto")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set model.knnlm.capacity=65536 (the default) "
                        "--set data.eval_max_doc_tokens=32768")
    t.set_defaults(func=cmd_knnlm_tune)

    g = sub.add_parser("generate", help="generate text from a run")
    g.add_argument("run_dir")
    g.add_argument("--prompt", required=True)
    g.add_argument("--tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("sorting", help="train + evaluate one model on the sorting task",
                       description="Train the model of a run config from scratch on the "
                                   "infinity-former's sorting task at each length, score it "
                                   "on fresh examples, write results.json and sorting.png.")
    s.add_argument("--config", required=True, help="run config TOML (model, batch, segments)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.continuous.layers=[0,1,2]")
    s.add_argument("--lengths", required=True, metavar="T,T",
                   help="sequence lengths, e.g. 1024,2048")
    s.add_argument("--steps", type=int, default=200, help="training steps per length")
    s.add_argument("--samples", type=int, default=64, help="evaluation examples per length")
    s.add_argument("--out", help="results directory (default reports/sorting-<config name>)")
    s.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="also score every N steps (a learning curve in results.json)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_sorting)

    d = sub.add_parser("demo", help="the demo: memory vs no memory from the shipped base model")
    d.add_argument("--quick", action="store_true", help="a 3-minute version")
    d.add_argument("--out", help="report directory (default reports/demo)")
    d.add_argument("--workdir", help="write data/ and reports/ here (default: the current "
                                     "directory)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    from memformers.compare.cli import add_compare_subparser
    from memformers.data.cli import add_data_subparser
    from memformers.diagnostics.cli import add_diagnose_subparser
    from memformers.hf.cli import add_hf_subparsers

    add_data_subparser(sub)
    add_compare_subparser(sub)
    add_diagnose_subparser(sub)
    add_hf_subparsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MemformersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
