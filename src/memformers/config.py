"""Typed configuration, loaded from TOML, overridden by ``--set``, validated here.

A run config has three sections -- ``[model]``, ``[data]``, ``[train]`` -- and
the model has one sub-section per memory mechanism (``[model.knn]``, ...).
``load_config(path, overrides)`` is the single entry point; every check on
values lives in ``validate``. Errors are one-line ``MemformersError``s that
name the key and, for unknown keys, suggest the closest known one.

The compare config (``memformers compare``; its dataclasses and loading are in
``memformers.compare.spec``) is read with the same ``build_table`` and checked
here too, by ``validate_eval_spec`` and ``validate_compare``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from memformers.errors import MemformersError
from memformers.memory.configs import (
    IVF_CODES,
    ContinuousConfig,
    InfiniConfig,
    KNNConfig,
    KNNLMConfig,
    PKMConfig,
    ivf_shape,
)

if TYPE_CHECKING:
    from memformers.compare.spec import CompareConfig, EvalSpec


@dataclass
class ModelConfig:
    vocab_size: int = 256  # overwritten from the corpus tokenizer at train time
    n_layers: int = 6
    d_model: int = 256
    n_heads: int = 8
    head_dim: int = 32  # n_heads * head_dim need not equal d_model (W_q/W_o map between)
    d_ff: int = 1024
    ffn: str = "gelu"  # "gelu" | "swiglu"
    position: str = "t5"  # "t5" (relative bias, Memorizing Transformers) | "rope" | "none"
    rel_buckets: int = 32
    rel_max_distance: int = 128
    rel_bias_lr_scale: float = 10.0  # the shared T5 bias table learns at this x train.lr
    rel_bias_init_slope: float = 0.25  # initial bias = -slope * bucket (0 = T5's zero init)
    rope_base: float = 10000.0
    dropout: float = 0.0
    xl_cache: bool = False  # attend to the previous segment's keys/values
    tie_embeddings: bool = True
    # A Hugging Face causal LM (directory or Hub name) to train instead of the memformers
    # model: its own architecture (the sizes above are ignored), with model.knn or
    # model.infini memories retrofitted into it (memformers.hf; `memformers finetune`).
    hf_path: str = ""
    knn: KNNConfig = field(default_factory=KNNConfig)
    pkm: PKMConfig = field(default_factory=PKMConfig)
    infini: InfiniConfig = field(default_factory=InfiniConfig)
    continuous: ContinuousConfig = field(default_factory=ContinuousConfig)
    knnlm: KNNLMConfig = field(default_factory=KNNLMConfig)  # output-side kNN-LM (no training)
    # attention memories added from outside the package (memory.register_attention_memory):
    # name -> its config, the table [model.memories.NAME] built as the class's config_class
    memories: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    corpus: str = "data/stdlib-byte"  # a directory made by `memformers data build`
    mix: list[str] = field(default_factory=list)  # more corpora whose train docs are mixed in
    segment_len: int = 512
    batch_size: int = 2  # parallel document streams, in all (split evenly over processes)
    eval_split: str = "valid"
    eval_max_docs: int = 64  # held-out documents streamed per evaluation (0 = all)
    eval_max_tokens: int = 0  # stop evaluation after this many tokens (0 = no limit)
    eval_max_doc_tokens: int = 0  # score only the first N tokens of each document (0 = all)
    eval_min_doc_tokens: int = 0  # evaluate only held-out documents at least this long
    # where the loss-by-position buckets after the first (0-2K) start, in tokens
    eval_buckets: list[int] = field(default_factory=lambda: [2048, 8192, 32768])
    min_doc_tokens: int = 1  # documents shorter than this are skipped


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = no clipping
    grad_accum: int = 1
    bptt_segments: int = 1  # detach carried state every N segments
    checkpoint_activations: bool = False  # recompute each segment in backward (bounded memory)
    eval_every: int = 0  # 0 = only at the end
    # at each eval_every: kNN key staleness on this many held-out segments (0 = off)
    staleness_segments: int = 16
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA) | "fp32" | "bf16" (also CPU)
    init_from: str = ""  # a run dir or model.safetensors to start from (fine-tuning)
    tensorboard: bool = False
    # multi-process runs (torchrun / --nproc; see train/distributed.py)
    parallel: str = "ddp"  # "ddp" (replicated weights) | "fsdp" (FSDP2 fully_shard per block)
    shard_pkm_values: bool = False  # product-key value tables sharded over the processes
    save_stream_state: bool = True  # checkpoint per-stream memories (exact mid-document resume)


@dataclass
class TaskConfig:
    """What the trainer trains on (``tasks/``; ``memformers train --task NAME``)."""

    name: str = "lm"  # "lm": the long documents of data.corpus | "passkey": passkey prompts
    # passkey: training prompt lengths (tokens); the loss is on the answer only, and only the
    # last train.bptt_segments segments of a prompt are trained (the earlier fill the memory)
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    eval_lengths: list[int] = field(default_factory=lambda: [4096, 16384, 65536])
    eval_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    eval_samples: int = 8  # prompts per (length, depth) cell
    digits: int = 5  # passkey digits


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the type ``tp`` of the config key ``key``: a dataclass
    (a table, built by ``build_table``), ``dict`` (a table of anything), bool, int, float,
    str, or a list / tuple of any of these."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) or tp is dict:
        if not isinstance(value, dict):
            raise MemformersError(f"config key '{key}' must be a table, got {value!r}")
        return build_table(tp, value, key) if tp is not dict else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise MemformersError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise MemformersError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MemformersError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise MemformersError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):  # e.g. bool | list[int]: the first that fits
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except MemformersError:
                pass
        names = " or ".join(getattr(t, "__name__", str(t)) for t in typing.get_args(tp))
        raise MemformersError(f"config key '{key}' must be {names}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise MemformersError(f"config key '{key}' must be a list, got {value!r}")
        args = typing.get_args(tp)
        items = [_coerce(v, args[0], key) for v in value]
        return tuple(items) if origin is tuple else items
    return value


def unknown_key_error(key: str, known: Iterable[str], where: str) -> MemformersError:
    """The error "unknown key 'KEY' in WHERE", suggesting the closest of ``known``."""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return MemformersError(f"unknown key '{key}' in {where}{hint}")


def build_table(cls: type, raw: dict, prefix: str = "", where: str = "") -> Any:
    """The dataclass ``cls`` from a TOML table: every key a field, every value of its type.

    Errors name a key by its dotted path (``prefix.key``). An unknown key is
    "unknown config key 'model.n_layer' (did you mean 'model.n_layers'?)", or, when
    ``where`` says how to call the table (e.g. "[eval]"), "unknown key 'x' in [eval]".
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            if where:
                raise unknown_key_error(k, names, where)
            close = difflib.get_close_matches(k, names, n=1)
            dotted = f"{prefix}.{close[0]}" if prefix and close else (close or [""])[0]
            hint = f" (did you mean '{dotted}'?)" if close else ""
            raise MemformersError(f"unknown config key '{key}'{hint}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values in TOML syntax) to a raw dict."""
    for item in overrides:
        if "=" not in item:
            raise MemformersError(f"--set expects key=value, got '{item}'")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise MemformersError(f"--set '{key}': '{p}' is not a section")
        node[parts[-1]] = _parse_value(text.strip())
    return raw


def knn_default_layer(n_layers: int) -> int:
    """The layer at 3/4 depth (0-based): the paper's 9th of 12; 4th of 6; 3rd of 4."""
    return max(0, round(0.75 * n_layers) - 1)


def _resolve_auto_layers(raw: dict) -> dict:
    """``model.knn.layers = "auto"``: the kNN memory at 3/4 depth (``knn_default_layer``)."""
    model = raw.get("model", {})
    knn = model.get("knn", {})
    if knn.get("layers") == "auto":
        if model.get("hf_path"):
            raise MemformersError("model.knn.layers = \"auto\" needs a memformers model; list "
                                  "the layers of a Hugging Face model (model.hf_path)")
        n = int(model.get("n_layers", ModelConfig.n_layers))
        raw = {**raw, "model": {**model, "knn": {**knn, "layers": [knn_default_layer(n)]}}}
    return raw


def config_from_dict(raw: dict) -> RunConfig:
    cfg = build_table(RunConfig, _resolve_auto_layers(raw))
    _build_registered_memories(cfg.model)
    validate(cfg)
    return cfg


def _build_registered_memories(model: ModelConfig) -> None:
    """[model.memories.NAME] tables as the config class of the memory registered as NAME."""
    from memformers.memory import ATTENTION_MEMORIES, attention_memory_class

    for name, raw in list(model.memories.items()):
        key = f"model.memories.{name}"
        if name not in ATTENTION_MEMORIES or hasattr(model, name):
            raise MemformersError(f"{key}: no attention memory is registered as '{name}' "
                                  "(memformers.memory.register_attention_memory)")
        if not isinstance(raw, dict):
            raise MemformersError(f"config key '{key}' must be a table, got {raw!r}")
        model.memories[name] = build_table(attention_memory_class(name).config_class, raw, key)


def read_toml(path: str | Path, what: str = "config file") -> dict:
    """A TOML file as a dict; a missing or malformed file is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise MemformersError(f"{what} not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise MemformersError(f"{what} {p} is not valid TOML: {e}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    raw = read_toml(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides or []))


def to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(cfg: Any) -> str:
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- validation


def _check_ivf(cfg: KNNConfig | KNNLMConfig, where: str, key_dim: int) -> None:
    nlist, train = ivf_shape(cfg)
    _check(min(cfg.ivf_nlist, cfg.ivf_train) >= 0 and 0 < cfg.ivf_nprobe <= nlist <= train,
           f"{where}: need 0 < ivf_nprobe <= ivf_nlist <= ivf_train (0 = auto), got "
           f"{cfg.ivf_nprobe} / {nlist} / {train}")
    _choice(cfg.ivf_codes, ("auto", *IVF_CODES), f"{where}.ivf_codes")
    _check(cfg.ivf_codes != "pq4" or key_dim % 8 == 0,
           f"{where}.ivf_codes 'pq4' needs keys of a size divisible by 8, got {key_dim}")
    _check(cfg.ivf_codes != "pq4" or train >= 16,
           f"{where}.ivf_codes 'pq4' trains 16 codes per sub-vector: ivf_train must be >= "
           f"16, got {train}")
    _check(cfg.ivf_rescore >= 0, f"{where}.ivf_rescore must be >= 0 (0 = top_k), got "
                                 f"{cfg.ivf_rescore}")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise MemformersError(msg)


def _choice(value: str, options: tuple[str, ...], key: str) -> None:
    _check(value in options, f"config key '{key}' must be one of {', '.join(options)}; "
                             f"got '{value}'")


def validate(cfg: RunConfig) -> None:
    m, d, t = cfg.model, cfg.data, cfg.train
    for key, val in [("model.vocab_size", m.vocab_size), ("model.n_layers", m.n_layers),
                     ("model.d_model", m.d_model), ("model.n_heads", m.n_heads),
                     ("model.head_dim", m.head_dim), ("model.d_ff", m.d_ff),
                     ("data.segment_len", d.segment_len), ("data.batch_size", d.batch_size),
                     ("train.steps", t.steps), ("train.grad_accum", t.grad_accum),
                     ("train.bptt_segments", t.bptt_segments), ("train.log_every", t.log_every)]:
        _check(val > 0, f"config key '{key}' must be positive, got {val}")
    _choice(m.ffn, ("gelu", "swiglu"), "model.ffn")
    _choice(m.position, ("t5", "rope", "none"), "model.position")
    _check(m.position != "rope" or m.head_dim % 2 == 0, "model.head_dim must be even for RoPE")
    _check(0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}")
    _check(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    _check(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = no clipping), got "
                             f"{t.grad_clip}")
    _check(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
           f"train.betas must be two numbers in [0, 1), got {list(t.betas)}")
    _check(m.position != "t5" or (m.rel_buckets > 0 and m.rel_max_distance > 0),
           f"model.rel_buckets and model.rel_max_distance must be positive, got "
           f"{m.rel_buckets} and {m.rel_max_distance}")
    _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]")
    _check(t.warmup_steps >= 0 and t.ckpt_every >= 0 and t.eval_every >= 0
           and t.staleness_segments >= 0,
           "train.warmup_steps, ckpt_every, eval_every and staleness_segments must be >= 0")
    _choice(t.precision, ("auto", "fp32", "bf16"), "train.precision")
    _check(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
           f"train.device must be auto, cpu or cuda[:N], got '{t.device}'")
    _choice(t.parallel, ("ddp", "fsdp"), "train.parallel")
    _check(not t.shard_pkm_values or m.pkm.layers,
           "train.shard_pkm_values needs product-key memory layers (model.pkm.layers)")
    _check(m.pkm.sparse is not True or (t.parallel == "ddp" and not t.shard_pkm_values),
           "model.pkm.sparse=true cannot be combined with train.parallel='fsdp' or "
           "train.shard_pkm_values: FSDP2 has no sparse gradients")
    _check(min(d.eval_max_docs, d.eval_max_tokens, d.eval_max_doc_tokens,
               d.eval_min_doc_tokens) >= 0,
           "data.eval_max_docs, eval_max_tokens, eval_max_doc_tokens and eval_min_doc_tokens "
           "must be >= 0")
    b = d.eval_buckets
    _check(all(isinstance(x, int) and not isinstance(x, bool) for x in b)
           and all(x < y for x, y in zip([0, *b], b)),
           f"data.eval_buckets must be increasing positive token positions, got {b!r}")
    task = cfg.task
    _choice(task.name, ("lm", "passkey"), "task.name")
    for key in ("lengths", "eval_lengths"):
        values = getattr(task, key)
        _check(bool(values) and all(n > 0 for n in values),
               f"task.{key} must be a non-empty list of positive lengths, got {values}")
    _check(bool(task.eval_depths) and all(0 <= x <= 1 for x in task.eval_depths),
           f"task.eval_depths must be a non-empty list of numbers in [0, 1], got "
           f"{task.eval_depths}")
    _check(task.eval_samples > 0 and task.digits > 0,
           "task.eval_samples and task.digits must be positive")
    _check(task.name == "lm" or not m.hf_path,
           f"task '{task.name}' trains a memformers model, not a Hugging Face one")

    if m.hf_path:  # layer indices are checked against the HF model by add_memory
        _check(not (m.pkm.layers or m.continuous.layers or m.xl_cache),
               "a Hugging Face model (model.hf_path) takes model.knn or model.infini "
               "memories only (no pkm, continuous or xl_cache)")
        _check(not (m.knn.layers and m.infini.layers),
               "a Hugging Face model takes one kind of memory: model.knn or model.infini")
        _check(not t.init_from, "train.init_from does not apply to a Hugging Face model "
                                "(model.hf_path already names its weights)")
        _check(not t.checkpoint_activations,
               "train.checkpoint_activations does not support a Hugging Face model "
               "(model.hf_path)")
    used: dict[int, str] = {}
    for name, sub in [*((n, getattr(m, n)) for n in ("knn", "infini", "continuous")),
                      *m.memories.items()]:
        for layer in sub.layers:
            _check(bool(m.hf_path) or 0 <= layer < m.n_layers,
                   f"model.{name}.layers: layer {layer} does not exist (model has "
                   f"{m.n_layers} layers, numbered 0..{m.n_layers - 1})")
            _check(layer not in used, f"layer {layer} has two attention memories "
                                      f"({used.get(layer)} and {name}); pick one")
            used[layer] = name
    for layer in m.pkm.layers:
        _check(0 <= layer < m.n_layers, f"model.pkm.layers: layer {layer} does not exist")

    k = m.knn
    _check(k.capacity >= 0, "model.knn.capacity must be >= 0")
    _check(k.top_k > 0, "model.knn.top_k must be positive")
    _choice(k.backend, ("auto", "exact", "ivf", "block", "faiss"), "model.knn.backend")
    _choice(k.combine, ("gate", "joint"), "model.knn.combine")
    _check(isinstance(k.normalize, bool) or set(k.normalize) <= set(k.layers),
           f"model.knn.normalize lists layers {k.normalize} that are not kNN layers "
           f"(model.knn.layers {k.layers})")
    _check_ivf(k, "model.knn", m.head_dim)
    _check(k.block_size > 0 and k.block_probe > 0 and k.block_group > 0,
           "model.knn.block_size, block_probe and block_group must be positive")
    _check(k.backend != "block" or k.capacity % k.block_size == 0,
           f"model.knn.capacity ({k.capacity}) must be a multiple of model.knn.block_size "
           f"({k.block_size}) with the block backend")
    _choice(k.storage_dtype, ("float16", "bfloat16", "float32"), "model.knn.storage_dtype")
    _choice(k.faiss_index, ("flat", "ivf", "hnsw"), "model.knn.faiss_index")
    _check(k.search_chunk > 0 and k.faiss_block > 0 and k.search_tile > 0
           and k.search_group > 0, "model.knn search sizes must be positive")
    _choice(k.search_dtype, ("float32", "bfloat16", "float16"), "model.knn.search_dtype")
    _check(k.search_rerank >= 0, "model.knn.search_rerank must be >= 0 (0 = 2 x top_k)")
    blk = min(k.faiss_block, max(k.capacity, 1))
    _check(k.backend != "faiss" or k.capacity % blk == 0,
           f"model.knn.capacity ({k.capacity}) must be a multiple of model.knn.faiss_block "
           f"({k.faiss_block}) with the faiss backend")

    n = m.knnlm
    _check(n.capacity >= 0, f"model.knnlm.capacity must be >= 0, got {n.capacity}")
    _check(n.top_k > 0, f"model.knnlm.top_k must be positive, got {n.top_k}")
    _check(n.temperature > 0, f"model.knnlm.temperature must be positive, got {n.temperature}")
    _check(0 <= n.lam < 1, f"model.knnlm.lam must be in [0, 1), got {n.lam}")
    _check(n.min_distance >= 0, f"model.knnlm.min_distance must be >= 0, got {n.min_distance}")
    _check(n.search_chunk > 0, f"model.knnlm.search_chunk must be positive, got {n.search_chunk}")
    _choice(n.similarity, ("cosine", "l2"), "model.knnlm.similarity")
    _choice(n.key, ("final_norm", "ffn_input"), "model.knnlm.key")
    _choice(n.storage_dtype, ("float16", "bfloat16", "float32"), "model.knnlm.storage_dtype")
    _choice(n.backend, ("auto", "exact", "ivf"), "model.knnlm.backend")
    _check_ivf(n, "model.knnlm", m.d_model)
    _check(0 < n.retrieve_below <= 1,
           f"model.knnlm.retrieve_below must be in (0, 1], got {n.retrieve_below}")
    _check(not (m.hf_path and n.capacity), "model.knnlm on a Hugging Face model needs no "
                                           "training: use memformers.hf.add_memory(model, "
                                           "kind='knnlm'), then memorize / ask")

    p = m.pkm
    _check(p.n_keys > 0 and p.heads > 0 and p.top_k > 0, "model.pkm sizes must be positive")
    _check(p.k_dim % 2 == 0, f"model.pkm.k_dim must be even, got {p.k_dim}")
    _check(p.top_k <= p.n_keys, f"model.pkm.top_k ({p.top_k}) must be <= n_keys ({p.n_keys})")
    _choice(p.query_norm, ("batchnorm", "layernorm", "none"), "model.pkm.query_norm")
    _check(p.sparse in (True, False, "auto"),
           f"model.pkm.sparse must be true, false or \"auto\", got {p.sparse!r}")

    i = m.infini
    _choice(i.update, ("linear", "delta"), "model.infini.update")
    _check(i.gate_lr > 0, "model.infini.gate_lr must be positive")
    _choice(i.feature, ("elu", "learned"), "model.infini.feature")
    _check(i.feature_dim == 0 or (i.feature == "learned" and i.feature_dim >= m.head_dim),
           f"model.infini.feature_dim needs feature = \"learned\" and must be >= head_dim "
           f"({m.head_dim}), got {i.feature_dim}")

    c = m.continuous
    _check(c.n_basis > 0 and c.n_basis % len(c.widths) == 0,
           "model.continuous.n_basis must be a positive multiple of len(widths)")
    _check(all(w > 0 for w in c.widths) and c.widths, "model.continuous.widths must be > 0")
    _check(0 < c.tau < 1, "model.continuous.tau must be in (0, 1)")
    _check(c.ridge_lambda >= 0 and c.n_samples > 0 and c.sticky_bins > 0,
           "model.continuous: ridge_lambda >= 0, n_samples > 0, sticky_bins > 0")


# --------------------------------------------------------------------------- compare config

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # a compare or variant name


def validate_eval_spec(spec: EvalSpec, name: Callable[[str], str] = lambda k: f"eval.{k}"
                       ) -> None:
    """The value checks of an ``[eval]`` table (``memformers compare``) or of the options of
    ``memformers eval``; ``name(key)`` is how an error names a key (e.g. an option)."""
    _check(all(0 <= x <= 1 for x in spec.passkey_depths),
           f"{name('passkey_depths')} must be numbers in [0, 1], got {spec.passkey_depths!r}")
    _check(len(spec.loss_diff) in (0, 2),
           f"{name('loss_diff')} must be two variant names, got {spec.loss_diff!r}")
    xl = spec.memory_sweep_xl
    _check(all(x in ("on", "off") for x in xl) and len(set(xl)) == len(xl),
           f"{name('memory_sweep_xl')} must be \"on\", \"off\" or both, got {xl!r}")
    for key in ("memory_sweep", "loss_diff_capacities", "passkey_lengths", "sorting_lengths"):
        values = getattr(spec, key)
        _check(all(x >= 0 for x in values),
               f"{name(key)} must be a list of integers >= 0, got {values!r}")
        _check(key in ("memory_sweep", "loss_diff_capacities") or all(x > 0 for x in values),
               f"{name(key)} must be positive integers, got {values!r}")
    _check(spec.split in ("", "train", "valid", "test"),
           f"{name('split')} must be train, valid or test; got '{spec.split}'")
    for key in ("passkey_samples", "sorting_steps", "sorting_samples"):
        _check(getattr(spec, key) >= 1, f"{name(key)} must be >= 1")
    for key in ("max_docs", "max_tokens", "loss_diff_doc"):
        _check(getattr(spec, key) >= -1, f"{name(key)} must be >= -1")
    _check(spec.winners >= 0, f"{name('winners')} must be >= 0")
    _check(not spec.passkey_lengths or bool(spec.passkey_depths),
           f"{name('passkey_depths')} must not be empty when {name('passkey_lengths')} is set")
    _check(not xl or bool(spec.memory_sweep),
           f"{name('memory_sweep_xl')} needs {name('memory_sweep')}")
    caps = spec.loss_diff_capacities
    _check(not caps or (len(caps) == 2 and set(caps) <= set(spec.memory_sweep)),
           f"{name('loss_diff_capacities')} must be two capacities of "
           f"{name('memory_sweep')}, got {caps}")


def _check_overrides(overrides: list[str], where: str) -> None:
    for item in overrides:
        _check("=" in item, f"{where}: expected key=value, got '{item}'")


def validate_compare(cc: CompareConfig) -> None:
    """The value checks of a compare config beyond its ``[eval]`` table (checked when it is
    read): names, ``set`` overrides, and the variants ``eval.loss_diff`` names."""
    _check(bool(NAME_RE.match(cc.name)),
           f"compare.name must be a name of letters, digits, '_.+-'; got {cc.name!r}")
    _check_overrides(cc.set, "compare.set")
    _check(bool(cc.variants), "the compare config needs at least one [[variant]] with a name")
    names: list[str] = []
    for i, v in enumerate(cc.variants):
        _check(bool(v.name), f"variant {i + 1} has no name")
        _check(bool(NAME_RE.match(v.name)),
               f"variant name must be letters, digits, '_.+-'; got {v.name!r}")
        _check(v.name not in names, f"two variants are named '{v.name}'; names must be unique")
        _check_overrides(v.set, f"variant '{v.name}' set")
        names.append(v.name)
    for n in cc.eval.loss_diff:
        if n not in names:
            raise unknown_key_error(n, names, "eval.loss_diff (variant names)")
