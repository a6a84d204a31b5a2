"""Train several model variants on equal terms and evaluate them: ``run_compare``.

The compare config (``memformers.compare.spec``) lists the variants; each one's run
config is the shared base plus its own overrides. ``run_compare`` trains (or reuses)
every variant with ``run_variant`` and evaluates it with
``memformers.compare.evaluation.evaluate_model``; ``memformers.compare.report`` turns
the results into report.md and plots.

Each variant lives in ``<out>/runs/<name>-<config hash>/``. A finished run there
(``model.safetensors`` and a ``results.json`` with the same config hash) is not
retrained; a run with checkpoints is resumed. Evaluation results are cached per
part (LM, passkey, memory sweep, sorting), each keyed by the settings it used, so
changing e.g. the passkey lengths re-runs only the passkey evaluation.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memformers.compare.evaluation import check_passkey_lengths, evaluate_model
from memformers.compare.spec import (
    CompareConfig,
    EvalSpec,
    VariantSpec,
    differing_settings,
    variant_config,
)
from memformers.config import RunConfig, config_hash, to_dict
from memformers.errors import MemformersError

# --------------------------------------------------------------------------- helpers


def _key(obj: Any) -> str:
    """A short hash of the settings an evaluation part used (its cache key)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    from memformers.train.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_train_metrics(run_dir: Path) -> dict:
    """The last training line of metrics.jsonl (used when a resumed run had nothing to do)."""
    last: dict = {}
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "tokens_per_s" in rec:
                last = rec
    except (OSError, ValueError):
        pass
    return last


def _train_metrics(run_dir: Path) -> dict:
    """What the trainer measured: train.json (written by compare), else metrics.jsonl."""
    return _read_json(run_dir / "train.json") or _last_train_metrics(run_dir)


# --------------------------------------------------------------------------- running


@dataclass
class VariantRun:
    """Everything needed to (re)build one variant's results."""

    spec: VariantSpec
    cfg: RunConfig
    run_dir: Path
    hash: str


def plan_runs(cc: CompareConfig, out_dir: Path) -> list[VariantRun]:
    """Every variant's run config (vocabulary from its corpus) and run directory."""
    from memformers.data.corpus import open_corpus_manifest
    from memformers.data.tokenizer import load_tokenizer

    runs = []
    for v in cc.variants:
        cfg = variant_config(cc, v)
        corpus = Path(cfg.data.corpus)
        try:
            open_corpus_manifest(corpus)
        except MemformersError as e:
            raise MemformersError(f"variant '{v.name}': {e}") from None
        cfg.model.vocab_size = load_tokenizer(corpus).vocab_size  # as the trainer does
        h = config_hash(cfg)
        runs.append(VariantRun(v, cfg, out_dir / "runs" / f"{v.name}-{h}", h))
    return runs


def load_cached_result(run: VariantRun) -> dict | None:
    """A finished variant's complete results.json, if it belongs to this config hash."""
    res = _read_json(run.run_dir / "results.json")
    if (res and res.get("config_hash") == run.hash and "cached" in res  # written last
            and (run.run_dir / "model.safetensors").is_file()):
        return res
    return None


class Stopped(Exception):
    """Training was stopped by SIGTERM; a checkpoint was saved."""


def run_variant(run: VariantRun, spec: EvalSpec, *, progress: bool = True,
                log: Callable[[str], None] = print) -> dict:
    """Train (or reuse / resume) one variant and evaluate every requested part."""
    from memformers.data.tokenizer import load_tokenizer
    from memformers.model import MemformerLM
    from memformers.train.checkpoint import latest_checkpoint, load_model_weights
    from memformers.train.trainer import Trainer, resolve_device

    cfg, run_dir = run.cfg, run.run_dir
    weights = run_dir / "model.safetensors"
    old = _read_json(run_dir / "results.json") or {}
    if old.get("config_hash") != run.hash or not weights.is_file():
        old = {}
    result: dict = {"name": run.spec.name, "config_hash": run.hash, "run_dir": str(run_dir),
                    "config": to_dict(cfg), "parts": {}, "trained": False, "recomputed": []}

    model = None
    if not weights.is_file():
        resume = latest_checkpoint(run_dir) is not None
        log(f"[{run.spec.name}] {'resuming' if resume else 'training'} in {run_dir}")
        trainer = Trainer(copy.deepcopy(cfg), run_dir, resume=resume, progress=progress)
        log(f"[{run.spec.name}] {trainer.describe()}")
        start = time.perf_counter()
        train = trainer.run()
        if "stopped_at" in train:
            raise Stopped(f"variant '{run.spec.name}' stopped at step {train['stopped_at']}; "
                          "checkpoint saved, run the same command again to resume")
        if "tokens_per_s" not in train:  # resumed at the last step: nothing was trained now
            train = _last_train_metrics(run_dir)
        train = {k: v for k, v in train.items() if k != "gates"}
        train["seconds"] = time.perf_counter() - start
        train["resumed"] = resume
        _write_json(run_dir / "train.json", train)
        result["trained"] = True
        old = {}  # a new model: every evaluation is stale
        model = trainer.model
        del trainer  # frees the optimiser state before evaluation
    if not result["trained"]:
        train = _train_metrics(run_dir)
    result["train"] = train

    device = resolve_device(cfg.train.device)
    tokenizer = load_tokenizer(Path(cfg.data.corpus))

    def get_model():
        nonlocal model
        if model is None:
            model = MemformerLM(cfg.model).to(device)
            load_model_weights(model, weights)
        return model.eval()

    def part(name: str, key_obj: Any, compute: Callable[[], Any]) -> Any:
        key = _key(key_obj)
        result["parts"][name] = key
        if old.get("parts", {}).get(name) == key and name in old:
            return old[name]
        log(f"[{run.spec.name}] evaluating {name}")
        result["recomputed"].append(name)
        result[name] = compute()
        _write_json(run_dir / "results.json", result)  # a later failure keeps this part
        return result[name]

    result.update(evaluate_model(get_model, cfg, tokenizer, spec, device=device,
                                 progress=progress, log=lambda s: log(f"[{run.spec.name}] {s}"),
                                 part=part))
    result["cached"] = not result["trained"] and not result["recomputed"]
    _write_json(run_dir / "results.json", result)
    return result


def eval_results(run_dir: Path, cfg: RunConfig, spec: EvalSpec, parts: dict) -> dict:
    """``memformers eval``'s results (``parts`` from ``evaluate_model``) shaped like those of
    ``run_compare``, with the run as the one variant, for ``write_report``."""
    variant = {"name": run_dir.resolve().name, "run_dir": str(run_dir), "config": to_dict(cfg),
               "train": _train_metrics(run_dir), "trained": False, "cached": False,
               "recomputed": [k for k, v in parts.items() if v is not None], **parts}
    return {"name": variant["name"], "title": f"Evaluation: {run_dir}",
            "eval": dataclasses.asdict(spec), "variants": [variant], "notes": []}


def run_compare(cc: CompareConfig, out_dir: str | Path, *, only: list[str] | None = None,
                progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run (or reuse) every variant, then return the report-level results dict.

    With ``only``, just those variants are run; the others appear in the results if a
    finished, up-to-date run of theirs is already cached in ``out_dir``.
    """
    out_dir = Path(out_dir)
    runs = plan_runs(cc, out_dir)
    if cc.eval.passkey_lengths:  # fail before any training, not after
        from memformers.data.tokenizer import load_tokenizer

        for corpus in {r.cfg.data.corpus for r in runs}:
            check_passkey_lengths(load_tokenizer(Path(corpus)), cc.eval.passkey_lengths)
    variants = []
    for run in runs:
        if only and run.spec.name not in only:
            cached = load_cached_result(run)
            if cached is not None:
                variants.append({**cached, "cached": True, "trained": False, "recomputed": []})
            continue
        variants.append(run_variant(run, cc.eval, progress=progress, log=log))
    notes = []
    diff = differing_settings({r.spec.name: r.cfg for r in runs})
    if diff:
        notes.append("variants differ in " + ", ".join(diff) + " (not an equal-terms comparison)")
    return {
        "name": cc.name,
        "config_file": str(cc.path) if cc.path else None,
        "compare_config": cc.raw,
        "cli_set": cc.cli_set,
        "eval": dataclasses.asdict(cc.eval),
        "variants": variants,
        "notes": notes,
    }
