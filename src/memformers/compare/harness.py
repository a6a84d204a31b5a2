"""Train several model variants on equal terms and evaluate them with one harness.

A compare config (TOML) names a base run config, overrides shared by every
variant, the evaluation to run, and the variants::

    [compare]
    name = "cpu-small"
    base_config = "configs/xl.toml"        # optional; relative to this file or the repo root
    set = ["train.steps=200"]              # applied to every variant
    [base.model]                           # optional: a run config inline, over base_config
    n_layers = 4
    [eval]
    passkey_lengths = [1024]
    [[variant]]
    name = "xl"
    set = ["model.xl_cache=true"]

Overrides are applied in this order: base config file, ``[base]``, ``compare.set``,
the variant's ``set`` (and ``init_from``), then the command line's ``--set``. Every
variant therefore sees the same data, tokens, seed and schedule unless it says
otherwise (the report notes any data/train setting that differs).

Each variant lives in ``<out>/runs/<name>-<config hash>/``. A finished run there
(``model.safetensors`` and a ``results.json`` with the same config hash) is not
retrained; a run with checkpoints is resumed. Evaluation results are cached per
part (LM, passkey, memory sweep, sorting), each keyed by the settings it used, so
changing e.g. the passkey lengths re-runs only the passkey evaluation.

``evaluate_model`` (every evaluation of one trained model) and the ``[eval]`` checks
(``eval_spec_from_dict``) are shared with ``memformers eval RUN_DIR``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from memformers.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_hash,
    read_toml,
    to_dict,
)
from memformers.errors import MemformersError

# --------------------------------------------------------------------------- config


@dataclass
class EvalSpec:
    """The ``[eval]`` table: what every variant is measured on."""

    split: str = ""  # "" = the run config's data.eval_split
    max_docs: int = -1  # -1 = the run config's data.eval_max_docs (0 = all)
    max_tokens: int = -1  # -1 = the run config's data.eval_max_tokens (0 = no limit)
    passkey_lengths: list[int] = field(default_factory=list)
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    passkey_samples: int = 4
    memory_sweep: list[int] = field(default_factory=list)  # kNN capacities (kNN variants only)
    memory_sweep_xl: list[str] = field(default_factory=list)  # "on"/"off"; [] = as trained
    loss_diff_capacities: list[int] = field(default_factory=list)  # two sweep capacities
    loss_diff_doc: int = -1  # held-out doc index for per-token losses; -1 = longest evaluated
    loss_diff: list[str] = field(default_factory=list)  # ["A", "B"]: variant pair to compare
    winners: int = 10  # tokens listed in report.md where the second model gains the most
    sorting_lengths: list[int] = field(default_factory=list)  # sequence lengths T
    sorting_steps: int = 200
    sorting_samples: int = 64


@dataclass
class VariantSpec:
    name: str
    set: list[str] = field(default_factory=list)
    init_from: str = ""


@dataclass
class CompareConfig:
    name: str
    path: Path | None  # the TOML file (None when built from a dict)
    base_raw: dict  # the base run config as a raw dict ({} = defaults)
    set: list[str]
    eval: EvalSpec
    variants: list[VariantSpec]
    cli_set: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)  # the compare config as read, for the report


COMPARE_KEYS = ("name", "base_config", "set", "description")
VARIANT_KEYS = ("name", "set", "init_from", "description")
TOP_KEYS = ("compare", "base", "eval", "variant")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _unknown(key: str, known, where: str) -> MemformersError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return MemformersError(f"unknown key '{key}' in {where}{hint}")


def _str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MemformersError(f"{where} must be a list of \"key=value\" strings, got {value!r}")
    for v in value:
        if "=" not in v:
            raise MemformersError(f"{where}: expected key=value, got '{v}'")
    return list(value)


def eval_spec_from_dict(raw: dict, name: Callable[[str], str] = lambda k: f"eval.{k}"
                        ) -> EvalSpec:
    """Validate an ``[eval]`` table; ``name(key)`` is how errors name a key (e.g. an option)."""
    if not isinstance(raw, dict):
        raise MemformersError("[eval] must be a table")
    hints = {f.name: f.type for f in dataclasses.fields(EvalSpec)}
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        if k not in hints:
            raise _unknown(k, hints, "[eval]")
        default = getattr(EvalSpec(), k)
        where = name(k)
        if isinstance(default, list):
            if not isinstance(v, list):
                raise MemformersError(f"{where} must be a list, got {v!r}")
            if k == "passkey_depths":
                if not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                           and 0 <= x <= 1 for x in v):
                    raise MemformersError(f"{where} must be numbers in [0, 1], got {v!r}")
                v = [float(x) for x in v]
            elif k == "loss_diff":
                if len(v) != 2 or not all(isinstance(x, str) for x in v):
                    raise MemformersError(f"{where} must be two variant names, got {v!r}")
            elif k == "memory_sweep_xl":
                if not all(x in ("on", "off") for x in v) or len(set(v)) != len(v):
                    raise MemformersError(f"{where} must be \"on\", \"off\" or both, got {v!r}")
            elif not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
                raise MemformersError(f"{where} must be a list of integers >= 0, got {v!r}")
            elif k not in ("memory_sweep", "loss_diff_capacities") and not all(x > 0 for x in v):
                raise MemformersError(f"{where} must be positive integers, got {v!r}")
        elif isinstance(default, str):
            if not isinstance(v, str):
                raise MemformersError(f"{where} must be a string, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, int):
            raise MemformersError(f"{where} must be an integer, got {v!r}")
        kwargs[k] = v
    spec = EvalSpec(**kwargs)
    if spec.split and spec.split not in ("train", "valid", "test"):
        raise MemformersError(f"{name('split')} must be train, valid or test; got '{spec.split}'")
    for k in ("passkey_samples", "sorting_steps", "sorting_samples"):
        if getattr(spec, k) < 1:
            raise MemformersError(f"{name(k)} must be >= 1")
    for k in ("max_docs", "max_tokens", "loss_diff_doc"):
        if getattr(spec, k) < -1:
            raise MemformersError(f"{name(k)} must be >= -1")
    if spec.winners < 0:
        raise MemformersError(f"{name('winners')} must be >= 0")
    if spec.passkey_lengths and not spec.passkey_depths:
        raise MemformersError(f"{name('passkey_depths')} must not be empty when "
                              f"{name('passkey_lengths')} is set")
    if spec.memory_sweep_xl and not spec.memory_sweep:
        raise MemformersError(f"{name('memory_sweep_xl')} needs {name('memory_sweep')}")
    if spec.loss_diff_capacities and (len(spec.loss_diff_capacities) != 2 or not set(
            spec.loss_diff_capacities) <= set(spec.memory_sweep)):
        raise MemformersError(f"{name('loss_diff_capacities')} must be two capacities of "
                              f"{name('memory_sweep')}, got {spec.loss_diff_capacities}")
    return spec


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/memformers: holds configs/


def _repo_root(start: Path) -> Path | None:
    for d in [start, *start.parents]:
        if (d / "pyproject.toml").is_file():
            return d
    return None


def resolve_path(text: str, config_file: Path | None) -> Path:
    """A path from a compare config: absolute, next to the file, in the cwd, or the repo root."""
    p = Path(text).expanduser()
    if p.is_absolute():
        return p
    candidates = []
    if config_file is not None:
        candidates.append(config_file.parent / p)
    candidates.append(Path.cwd() / p)
    if config_file is not None and (root := _repo_root(config_file.resolve().parent)):
        candidates.append(root / p)
    candidates.append(PACKAGE_DIR / p)  # configs/... shipped inside the package
    for c in candidates:
        if c.exists():
            return c.resolve()
    return candidates[0]


def _merge(a: dict, b: dict) -> dict:
    """``b`` over ``a``, recursively for tables."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else copy.deepcopy(v)
    return out


def compare_config_from_dict(raw: dict, path: Path | None = None,
                             cli_set: list[str] | None = None,
                             only: list[str] | None = None) -> CompareConfig:
    """Validate a parsed compare config; every problem is one ``MemformersError`` line."""
    for k in raw:
        if k not in TOP_KEYS:
            raise _unknown(k, TOP_KEYS, "the compare config")
    comp = raw.get("compare")
    if not isinstance(comp, dict):
        raise MemformersError("the compare config needs a [compare] table with a name")
    for k in comp:
        if k not in COMPARE_KEYS:
            raise _unknown(k, COMPARE_KEYS, "[compare]")
    name = comp.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise MemformersError(f"compare.name must be a name of letters, digits, '_.+-'; "
                              f"got {name!r}")
    base_raw: dict = {}
    if "base_config" in comp:
        if not isinstance(comp["base_config"], str):
            raise MemformersError("compare.base_config must be a path string")
        base_raw = read_toml(resolve_path(comp["base_config"], path), "compare.base_config")
    inline = raw.get("base", {})
    if not isinstance(inline, dict):
        raise MemformersError("[base] must be a table laid out like a run config "
                              "([base.model], [base.data], [base.train])")
    base_raw = _merge(base_raw, inline)
    shared = _str_list(comp.get("set", []), "compare.set")
    spec = eval_spec_from_dict(raw.get("eval", {}))

    raw_variants = raw.get("variant")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise MemformersError("the compare config needs at least one [[variant]] with a name")
    variants: list[VariantSpec] = []
    for i, v in enumerate(raw_variants):
        if not isinstance(v, dict):
            raise MemformersError(f"variant {i + 1} must be a table")
        for k in v:
            if k not in VARIANT_KEYS:
                raise _unknown(k, VARIANT_KEYS, f"variant {v.get('name', i + 1)!r}")
        vname = v.get("name")
        if vname is None:
            raise MemformersError(f"variant {i + 1} has no name")
        if not isinstance(vname, str) or not NAME_RE.match(vname):
            raise MemformersError(f"variant name must be letters, digits, '_.+-'; got {vname!r}")
        if any(x.name == vname for x in variants):
            raise MemformersError(f"two variants are named '{vname}'; names must be unique")
        init = v.get("init_from", "")
        if not isinstance(init, str):
            raise MemformersError(f"variant '{vname}': init_from must be a path string")
        if init:
            init = str(resolve_path(init, path))
        variants.append(VariantSpec(vname, _str_list(v.get("set", []), f"variant '{vname}' set"),
                                    init))
    names = [v.name for v in variants]
    for n in spec.loss_diff:
        if n not in names:
            raise _unknown(n, names, "eval.loss_diff (variant names)")
    if only:
        for n in only:
            if n not in names:
                raise _unknown(n, names, "--only (variant names)")
    cc = CompareConfig(name=name, path=path, base_raw=base_raw, set=shared, eval=spec,
                       variants=variants, cli_set=list(cli_set or []), raw=raw)
    for v in variants:  # every variant's run config must be valid before anything trains
        variant_config(cc, v)
    return cc


def load_compare_config(path: str | Path, cli_set: list[str] | None = None,
                        only: list[str] | None = None) -> CompareConfig:
    return compare_config_from_dict(read_toml(path, "compare config"), Path(path), cli_set,
                                    only)


def variant_config(cc: CompareConfig, v: VariantSpec) -> RunConfig:
    """The variant's full run config (base, shared, own and CLI overrides, in that order)."""
    raw = copy.deepcopy(cc.base_raw)
    own = list(v.set) + ([f"train.init_from={json.dumps(v.init_from)}"] if v.init_from else [])
    try:
        apply_overrides(raw, [*cc.set, *own, *cc.cli_set])
        cfg = config_from_dict(raw)
    except MemformersError as e:
        raise MemformersError(f"variant '{v.name}': {e}") from None
    cfg.data.corpus = str(Path(cfg.data.corpus).expanduser())
    return cfg


def differing_settings(cfgs: dict[str, RunConfig]) -> list[str]:
    """data.* / train.* keys whose values differ between variants (should be none)."""
    flat: dict[str, set] = {}
    for cfg in cfgs.values():
        d = to_dict(cfg)
        for section in ("data", "train"):
            for k, val in d[section].items():
                if f"{section}.{k}" in ("train.init_from", "train.device", "train.tensorboard"):
                    continue
                flat.setdefault(f"{section}.{k}", set()).add(json.dumps(val))
    return sorted(k for k, vals in flat.items() if len(vals) > 1)


# --------------------------------------------------------------------------- helpers


def _key(obj: Any) -> str:
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


def measure_state_bytes(model, segment_len: int, device) -> int:
    """Per-stream state bytes after two segments of one stream (fills XL caches)."""
    from memformers.memory.state import state_bytes_per_stream

    was = model.training
    model.eval()
    with torch.no_grad():
        model.allocate_state(1, device)
        tokens = torch.zeros(1, segment_len, dtype=torch.long, device=device)
        for i in range(2):
            model(tokens, new_doc=torch.tensor([i == 0], device=device))
    n = state_bytes_per_stream(model)
    model.train(was)
    return int(n)


def resolve_doc_index(split, spec: EvalSpec, n_docs: int) -> int:
    """The held-out document for per-token losses (-1 = the longest evaluated)."""
    if n_docs <= 0:
        return -1
    if spec.loss_diff_doc >= 0:
        return spec.loss_diff_doc if spec.loss_diff_doc < n_docs else -1
    return int(np.argmax([split.doc_len(i) for i in range(n_docs)]))


def _lm_eval(model, split, token_bytes, cfg: RunConfig, max_docs: int, max_tokens: int,
             doc: int, autocast, progress: bool) -> dict:
    from memformers.evaluate.lm import evaluate_lm

    start = time.perf_counter()
    ev = evaluate_lm(model, split, token_bytes, batch_size=cfg.data.batch_size,
                     segment_len=cfg.data.segment_len, max_docs=max_docs,
                     max_tokens=max_tokens, max_doc_tokens=cfg.data.eval_max_doc_tokens,
                     record_docs=(doc,) if doc >= 0 else (),
                     autocast=autocast, progress=progress)
    seconds = time.perf_counter() - start
    per_token = ev.pop("per_token", {})
    ev["seconds"] = seconds
    ev["tokens_per_s"] = ev["tokens"] / max(seconds, 1e-9)
    losses = per_token.get(doc, [])
    ev["doc_losses"] = {"doc": doc, "losses": [round(float(x), 4) for x in losses]}
    return ev


# --------------------------------------------------------------------------- sorting


def sorting_segments(task, segment_len: int) -> tuple[int, list[bool]]:
    """(number of segments, which of them hold scored target positions) for one example.

    The LM example is ``T + vocab`` positions (padded to whole segments); the labels at
    positions T .. T + vocab - 1 (the sorted symbols) are the only scored ones.
    """
    L = segment_len
    n_seg = -(-(task.total_len - 1) // L)
    first, end = task.length, task.length + task.vocab  # scored label positions [first, end)
    return n_seg, [s * L < end and (s + 1) * L > first for s in range(n_seg)]


def segments_needing_grad(scored: list[bool], window: int) -> list[bool]:
    """Per segment: does its forward need autograd?

    The carried state is detached after every block of ``window`` segments (0..window-1,
    window..2*window-1, ...), so a segment's graph reaches a loss only if a scored segment
    comes at or after it in the same block. Every other segment runs under ``no_grad``:
    the same computation and state updates, without building a graph that is thrown away.
    """
    n = len(scored)
    return [any(scored[s:min(n, (s // window + 1) * window)]) for s in range(n)]


def _sorting_batches(n_seg: int, L: int, inputs: np.ndarray, labels: np.ndarray, device):
    """(s, x, y, mask) per segment of a batch padded at the end to ``n_seg * L``."""
    pad = n_seg * L - inputs.shape[1]
    x = torch.as_tensor(np.pad(inputs, ((0, 0), (0, pad))), device=device)  # (B, n_seg*L)
    y = torch.as_tensor(np.pad(labels, ((0, 0), (0, pad)), constant_values=-100),
                        device=device)  # (B, n_seg*L)
    m = torch.ones_like(x, dtype=torch.bool)
    m[:, m.shape[1] - pad:] = False
    for s in range(n_seg):
        sl = slice(s * L, (s + 1) * L)
        yield s, x[:, sl], y[:, sl], m[:, sl]


def train_sorting(cfg: RunConfig, length: int, steps: int, device, autocast,
                  progress: bool = True, on_step=None):
    """(model, train seconds): the variant's architecture trained from scratch on sorting.

    Each example (T symbols, SEP, 20 targets) is one stream, streamed segment by segment
    from a fresh state; only the target tokens are scored. Same optimiser and schedule as
    LM training, ``steps`` steps, warm-up capped at a tenth of them. ``on_step(step,
    model)``, if given, runs after every optimiser step (e.g. a learning curve).
    """
    from memformers.model import MemformerLM, lm_loss
    from memformers.tasks.sorting import SortingTask
    from memformers.train.optim import build_optimizers, set_lr
    from memformers.train.trainer import aux_losses

    task = SortingTask(length)
    mcfg = copy.deepcopy(cfg.model)
    mcfg.vocab_size = task.vocab_size
    tcfg = dataclasses.replace(cfg.train, steps=steps,
                               warmup_steps=min(cfg.train.warmup_steps, steps // 10))
    torch.manual_seed(cfg.train.seed)
    model = MemformerLM(mcfg).to(device)
    opts = build_optimizers(model, tcfg)
    B, L, window = cfg.data.batch_size, cfg.data.segment_len, cfg.train.bptt_segments
    n_seg, scored = sorting_segments(task, L)
    grad = segments_needing_grad(scored, window)
    rng = np.random.default_rng([cfg.train.seed, length, 0])
    start = time.perf_counter()
    model.train()
    for step in tqdm(range(steps), desc=f"sorting T={length}", disable=not progress,
                     leave=False):
        set_lr(opts, step, tcfg)
        inputs, labels = task.batch(B, rng)
        n_scored = max(int((labels != -100).sum()), 1)
        pending: list[torch.Tensor] = []
        for s, x, y, m in _sorting_batches(n_seg, L, inputs, labels, device):
            with torch.set_grad_enabled(grad[s]), autocast:
                logits = model(x, new_doc=torch.full((B,), s == 0, device=device), mask=m)
            if scored[s]:
                pending.append(lm_loss(logits, y, reduction="sum") + aux_losses(model))
            if (s + 1) % window == 0 or s == n_seg - 1:
                if pending:
                    (sum(pending) / n_scored).backward()
                model.detach_state()
                pending = []
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or math.inf)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1, model)
            model.train()
    return model, time.perf_counter() - start


@torch.no_grad()
def eval_sorting(model, cfg: RunConfig, length: int, samples: int, device, autocast) -> dict:
    """Greedy (teacher-forced) next-token accuracy and loss on the target symbols of
    ``samples`` fresh examples (a different random stream from training)."""
    from memformers.model import lm_loss
    from memformers.tasks.sorting import SortingTask

    task = SortingTask(length)
    B, L = cfg.data.batch_size, cfg.data.segment_len
    n_seg, _ = sorting_segments(task, L)
    rng = np.random.default_rng([cfg.train.seed, length, 1])
    model.eval()
    correct = scored = 0
    nll = 0.0
    for first in range(0, samples, B):
        inputs, labels = task.batch(min(B, samples - first), rng)
        preds = []
        for s, x, y, m in _sorting_batches(n_seg, L, inputs, labels, device):
            with autocast:
                logits = model(x, new_doc=torch.full((x.shape[0],), s == 0, device=device),
                               mask=m)
            nll += float(lm_loss(logits, y, reduction="sum"))
            preds.append(logits.argmax(-1).cpu().numpy())
        pred = np.concatenate(preds, axis=1)[:, : labels.shape[1]]
        keep = labels != -100
        correct += int((pred[keep] == labels[keep]).sum())
        scored += int(keep.sum())
    return {"accuracy": correct / max(scored, 1), "loss": nll / max(scored, 1)}


def train_eval_sorting(cfg: RunConfig, length: int, steps: int, samples: int, device,
                       autocast, progress: bool = True, eval_every: int = 0,
                       on_curve=None) -> dict:
    """Train on the sorting task of length T (``train_sorting``), then score it
    (``eval_sorting``): {length, steps, samples, accuracy, loss, train_seconds}.

    With ``eval_every`` > 0 the same fresh examples are also scored every that many
    steps: "curve" lists {step, accuracy, loss, seconds}, and ``on_curve(curve)`` is
    called after each point (so a long run can write what it has so far).
    """
    curve: list[dict] = []
    start = time.perf_counter()

    def score(step: int, model) -> None:
        if eval_every > 0 and step % eval_every == 0 and step < steps:
            scores = eval_sorting(model, cfg, length, samples, device, autocast)
            curve.append({"step": step, **scores,
                          "seconds": round(time.perf_counter() - start, 1)})
            if on_curve is not None:
                on_curve(curve)

    model, seconds = train_sorting(cfg, length, steps, device, autocast, progress, score)
    scores = eval_sorting(model, cfg, length, samples, device, autocast)
    result = {"length": length, "steps": steps, "samples": samples, **scores,
              "train_seconds": seconds}
    if eval_every > 0:
        result["curve"] = curve + [{"step": steps, **scores,
                                    "seconds": round(time.perf_counter() - start, 1)}]
    return result


# --------------------------------------------------------------------------- running


@dataclass
class VariantRun:
    """Everything needed to (re)build one variant's results."""

    spec: VariantSpec
    cfg: RunConfig
    run_dir: Path
    hash: str


def plan_runs(cc: CompareConfig, out_dir: Path) -> list[VariantRun]:
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


def _compute(name: str, key_obj: Any, compute: Callable[[], Any]) -> Any:
    """The ``part`` of ``evaluate_model`` that caches nothing."""
    return compute()


def check_passkey_lengths(tokenizer, lengths: list[int], where: str = "eval.passkey_lengths"
                          ) -> None:
    """Fail early (before any training or evaluation) on a length too short for the prompt."""
    from memformers.tasks.passkey import build_passkey_prompt

    for n in lengths:
        try:
            build_passkey_prompt(tokenizer, n, 0.5, "12345")
        except MemformersError as e:
            raise MemformersError(f"{where}: {e}") from None


def sweep_settings(cfg: RunConfig, spec: EvalSpec) -> list[tuple[int, bool]]:
    """(kNN capacity, XL cache on) of every memory-sweep point, XL setting by setting."""
    xl = [x == "on" for x in spec.memory_sweep_xl] or [cfg.model.xl_cache]
    return [(cap, on) for on in xl for cap in sorted(set(spec.memory_sweep))]


def memory_sweep(model, cfg: RunConfig, tokenizer, settings: list[tuple[int, bool]],
                 evaluate: Callable[[Any, RunConfig], dict],
                 log: Callable[[str], None] = print) -> list[dict]:
    """The same trained weights evaluated with other kNN capacities / XL cache settings.

    Each point is ``model`` rebuilt with ``model.knn.capacity`` and ``model.xl_cache``
    overridden (neither has parameters) and scored by ``evaluate(model, config)``; a
    setting that cannot be built (e.g. a memory too large for this machine) becomes a
    point with an ``error``.
    """
    from memformers.model import build_model

    weights = model.state_dict()
    points = []
    for cap, xl in settings:
        point = {"capacity": cap, "xl_cache": xl}
        try:
            c = config_from_dict(apply_overrides(to_dict(cfg), [
                f"model.knn.capacity={cap}", f"model.xl_cache={str(xl).lower()}"]))
            m = build_model(c.model, tokenizer).to(next(model.parameters()).device)
            m.load_state_dict(weights)
            points.append({**point, **evaluate(m.eval(), c)})
        except MemformersError as e:
            log(f"memory sweep capacity {cap}, XL cache {'on' if xl else 'off'}: {e}")
            points.append({**point, "error": str(e)})
    return points


def evaluate_model(get_model: Callable[[], Any], cfg: RunConfig, tokenizer, spec: EvalSpec, *,
                   device, progress: bool = True, log: Callable[[str], None] = print,
                   part: Callable[[str, Any, Callable[[], Any]], Any] = _compute) -> dict:
    """Every evaluation ``spec`` asks for of one trained model (``memformers compare`` and
    ``memformers eval``): static facts, held-out LM loss, passkey, memory sweep, sorting.

    ``get_model()`` returns the model (compare loads it only when a part is not cached);
    ``part(name, settings, compute)`` returns ``compute()`` or a result cached for the
    same settings. Returns ``{"static", "eval", "passkey", "memory_sweep", "sorting"}``
    (``None`` for a part ``spec`` does not ask for; the sweep needs kNN layers).
    """
    from memformers.data.corpus import CorpusSplit
    from memformers.evaluate.passkey import evaluate_passkey
    from memformers.train.trainer import autocast_for, gate_report

    autocast = autocast_for(device, cfg.train.precision)
    split_name = spec.split or cfg.data.eval_split
    split = CorpusSplit.open(Path(cfg.data.corpus), split_name)
    max_docs = cfg.data.eval_max_docs if spec.max_docs < 0 else spec.max_docs
    max_tokens = cfg.data.eval_max_tokens if spec.max_tokens < 0 else spec.max_tokens
    n_docs = split.n_docs if not max_docs else min(max_docs, split.n_docs)
    doc = resolve_doc_index(split, spec, n_docs)
    lm_key = {"split": split_name, "max_docs": max_docs, "max_tokens": max_tokens, "doc": doc}
    if cfg.data.eval_max_doc_tokens:  # absent otherwise: earlier cached results stay valid
        lm_key["max_doc_tokens"] = cfg.data.eval_max_doc_tokens

    def lm_eval(model, c: RunConfig) -> dict:
        return _lm_eval(model, split, tokenizer.token_bytes, c, max_docs, max_tokens, doc,
                        autocast, progress)

    def static():
        m = get_model()
        return {"params": m.num_parameters(), "gates": gate_report(m),
                "state_bytes_per_stream": measure_state_bytes(m, cfg.data.segment_len, device)}

    out: dict = {"static": part("static", {"v": 1}, static),
                 "eval": part("eval", lm_key, lambda: lm_eval(get_model(), cfg)),
                 "passkey": None, "memory_sweep": None, "sorting": None}
    if spec.passkey_lengths:
        pk = {"lengths": spec.passkey_lengths, "depths": spec.passkey_depths,
              "samples": spec.passkey_samples}
        out["passkey"] = part("passkey", pk, lambda: evaluate_passkey(
            get_model(), tokenizer, spec.passkey_lengths, spec.passkey_depths,
            segment_len=cfg.data.segment_len, samples_per_cell=spec.passkey_samples,
            seed=cfg.train.seed, device=device, progress=progress))
    if spec.memory_sweep and cfg.model.knn.layers:
        settings = sweep_settings(cfg, spec)
        key = {**lm_key, "caps": spec.memory_sweep}
        if spec.memory_sweep_xl:  # absent otherwise: sweeps cached before it existed stay valid
            key["xl"] = spec.memory_sweep_xl
        out["memory_sweep"] = part("memory_sweep", key, lambda: memory_sweep(
            get_model(), cfg, tokenizer, settings, lm_eval, log))
    if spec.sorting_lengths:
        def sorting() -> dict:
            return {str(t): train_eval_sorting(cfg, t, spec.sorting_steps, spec.sorting_samples,
                                               device, autocast, progress)
                    for t in spec.sorting_lengths}
        out["sorting"] = part("sorting", {"lengths": spec.sorting_lengths,
                                          "steps": spec.sorting_steps,
                                          "samples": spec.sorting_samples}, sorting)
    return out


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
