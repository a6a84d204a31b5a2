"""Every evaluation of one trained model: ``evaluate_model``.

Shared by ``memformers compare`` (each variant, with every part cached by the settings
it used; see ``harness.run_variant``) and ``memformers eval RUN_DIR``. The parts are
static facts (parameters, gates, state bytes per stream), the held-out LM loss, passkey
retrieval, a memory-size sweep (the same weights with other kNN capacities / XL cache
settings) and the sorting task (``memformers.tasks.sorting``), as an ``EvalSpec`` asks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memformers.compare.spec import EvalSpec
from memformers.config import DataConfig, RunConfig, apply_overrides, config_from_dict, to_dict
from memformers.errors import MemformersError
from memformers.evaluate.lm import eval_documents
from memformers.tasks.sorting import train_eval_sorting


def measure_state_bytes(model, segment_len: int, device) -> int:
    """Per-stream state bytes after two segments of one stream (fills XL caches)."""
    from memformers.memory.state import state_bytes_per_stream
    from memformers.runner import SegmentRunner, segments_of

    runner = SegmentRunner(model)
    with runner.fresh_state(1, device):
        tokens = torch.zeros(1, 2 * segment_len, dtype=torch.long, device=device)
        list(runner.run(segments_of(tokens, segment_len)))
        return int(state_bytes_per_stream(model))


def resolve_doc_index(split, spec: EvalSpec, docs: list[int]) -> int:
    """The held-out document for per-token losses: the ``loss_diff_doc``-th of the evaluated
    ``docs``, or the longest of them by default (-1 = none)."""
    if not docs:
        return -1
    if spec.loss_diff_doc >= 0:
        return docs[spec.loss_diff_doc] if spec.loss_diff_doc < len(docs) else -1
    return docs[int(np.argmax([split.doc_len(i) for i in docs]))]


def _lm_eval(model, split, token_bytes, cfg: RunConfig, max_docs: int, max_tokens: int,
             doc: int, autocast, progress: bool) -> dict:
    from memformers.evaluate.lm import evaluate_lm

    start = time.perf_counter()
    ev = evaluate_lm(model, split, token_bytes, batch_size=cfg.data.batch_size,
                     segment_len=cfg.data.segment_len, max_docs=max_docs,
                     max_tokens=max_tokens, max_doc_tokens=cfg.data.eval_max_doc_tokens,
                     min_doc_tokens=cfg.data.eval_min_doc_tokens,
                     buckets=(0, *cfg.data.eval_buckets),
                     record_docs=(doc,) if doc >= 0 else (),
                     autocast=autocast, progress=progress)
    seconds = time.perf_counter() - start
    per_token = ev.pop("per_token", {})
    ev["seconds"] = seconds
    ev["tokens_per_s"] = ev["tokens"] / max(seconds, 1e-9)
    losses = per_token.get(doc, [])
    ev["doc_losses"] = {"doc": doc, "losses": [round(float(x), 4) for x in losses]}
    return ev


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
    d = cfg.data
    doc = resolve_doc_index(split, spec, eval_documents(split, max_docs, d.eval_min_doc_tokens))
    lm_key = {"split": split_name, "max_docs": max_docs, "max_tokens": max_tokens, "doc": doc}
    # each absent at its default, so that earlier cached results stay valid
    if d.eval_max_doc_tokens:
        lm_key["max_doc_tokens"] = d.eval_max_doc_tokens
    if d.eval_min_doc_tokens:
        lm_key["min_doc_tokens"] = d.eval_min_doc_tokens
    if d.eval_buckets != DataConfig().eval_buckets:
        lm_key["buckets"] = d.eval_buckets

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
