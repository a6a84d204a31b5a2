"""The compare config: what ``memformers compare`` trains and how it measures it.

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
otherwise (``differing_settings`` lists any data/train setting that differs).

The tables are read by the run config's own ``build_table`` (types, unknown keys
with "did you mean" hints) and checked by ``validate_eval_spec`` and
``validate_compare`` in ``memformers.config``. ``eval_spec_from_dict`` is shared
with ``memformers eval RUN_DIR``, whose options are the ``[eval]`` keys.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from memformers.config import (
    RunConfig,
    apply_overrides,
    build_table,
    config_from_dict,
    read_toml,
    to_dict,
    unknown_key_error,
    validate_compare,
    validate_eval_spec,
)
from memformers.errors import MemformersError


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
    """One ``[[variant]]`` table."""

    name: str = ""
    set: list[str] = field(default_factory=list)  # "key=value" run-config overrides
    init_from: str = ""  # a run dir or model.safetensors (resolved like base_config)
    description: str = ""


@dataclass
class CompareTable:
    """The ``[compare]`` table."""

    name: str = ""
    base_config: str = ""  # a run config TOML (see resolve_path)
    set: list[str] = field(default_factory=list)  # overrides shared by every variant
    description: str = ""


@dataclass
class CompareFile:
    """A compare config's tables as laid out in its file (each is read on its own, so that
    errors can call it "[eval]" or "variant 'xl'")."""

    compare: dict = field(default_factory=dict)
    base: dict = field(default_factory=dict)  # a run config: [base.model], [base.data], ...
    eval: dict = field(default_factory=dict)
    variant: list[dict] = field(default_factory=list)


@dataclass
class CompareConfig:
    """A compare config, read and checked: everything ``run_compare`` needs."""

    name: str
    path: Path | None  # the TOML file (None when built from a dict)
    base_raw: dict  # the base run config as a raw dict ({} = defaults)
    set: list[str]
    eval: EvalSpec
    variants: list[VariantSpec]
    cli_set: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)  # the compare config as read, for the report


def eval_spec_from_dict(raw: dict, name: Callable[[str], str] = lambda k: f"eval.{k}"
                        ) -> EvalSpec:
    """Read and check an ``[eval]`` table; ``name(key)`` is how errors name a key's value
    (e.g. as an option of ``memformers eval``)."""
    spec = build_table(EvalSpec, raw, "eval", "[eval]")
    validate_eval_spec(spec, name)
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


def _variant_label(i: int, raw: dict) -> str:
    """How errors call the i-th ``[[variant]]``: by its name, else by its number."""
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"variant {name!r}" if isinstance(name, str) else f"variant {i + 1}"


def compare_config_from_dict(raw: dict, path: Path | None = None,
                             cli_set: list[str] | None = None,
                             only: list[str] | None = None) -> CompareConfig:
    """Read and check a parsed compare config; every problem is one ``MemformersError`` line.

    ``path`` is the file it came from (relative paths are resolved next to it); ``cli_set``
    are the command line's overrides; ``only`` the variants the command line asks for.
    """
    tables = build_table(CompareFile, raw, where="the compare config")
    compare = build_table(CompareTable, tables.compare, "compare", "[compare]")
    variants = [build_table(VariantSpec, v, "variant", _variant_label(i, v))
                for i, v in enumerate(tables.variant)]
    for v in variants:
        if v.init_from:
            v.init_from = str(resolve_path(v.init_from, path))
    base_raw = (read_toml(resolve_path(compare.base_config, path), "compare.base_config")
                if compare.base_config else {})
    cc = CompareConfig(name=compare.name, path=path, base_raw=_merge(base_raw, tables.base),
                       set=compare.set, eval=eval_spec_from_dict(tables.eval),
                       variants=variants, cli_set=list(cli_set or []), raw=raw)
    validate_compare(cc)
    names = [v.name for v in variants]
    for n in only or []:
        if n not in names:
            raise unknown_key_error(n, names, "--only (variant names)")
    for v in variants:  # every variant's run config must be valid before anything trains
        variant_config(cc, v)
    return cc


def load_compare_config(path: str | Path, cli_set: list[str] | None = None,
                        only: list[str] | None = None) -> CompareConfig:
    """Read a compare config TOML file (see ``compare_config_from_dict``)."""
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
