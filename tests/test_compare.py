"""memformers compare: config validation, variant runs with caching, report contents."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from memformers.compare.cli import add_compare_subparser
from memformers.compare.harness import run_compare
from memformers.compare.report import (
    choose_loss_pair,
    loss_difference,
    print_table,
    write_report,
)
from memformers.compare.spec import compare_config_from_dict, load_compare_config
from memformers.errors import MemformersError
from memformers.memory.base import AttentionMemory
from tests.conftest import TINY_MODEL

VARIANTS = '''
[[variant]]
name = "baseline"

[[variant]]
name = "xl"
set = ["model.xl_cache=true"]

[[variant]]
name = "xl+infini"
set = ["model.xl_cache=true", "model.infini.layers=[1]"]
'''




def _toml(corpus: Path, variants: str = VARIANTS, xl_extra: str = "") -> str:
    sets = ", ".join(json.dumps(s) for s in
                     [*TINY_MODEL, f'data.corpus="{corpus}"', "train.steps=5"])
    return f'''
[compare]
name = "tiny"
set = [{sets}]

[eval]
max_docs = 2
max_tokens = 1200
passkey_lengths = [320]
passkey_depths = [0.5]
passkey_samples = 2
sorting_lengths = [12]
sorting_steps = 2
sorting_samples = 4
''' + variants.replace('set = ["model.xl_cache=true"]',
                       f'set = ["model.xl_cache=true"{xl_extra}]')


@pytest.fixture(scope="module")
def compared(one_thread, tiny_corpus, tmp_path_factory):
    """One compare run of three tiny variants: (config file, out dir, results)."""
    root = tmp_path_factory.mktemp("compare")
    cfg_file = root / "tiny.toml"
    cfg_file.write_text(_toml(tiny_corpus))
    out = root / "report"
    results = run_compare(load_compare_config(cfg_file), out, progress=False, log=lambda s: None)
    write_report(results, out)
    return cfg_file, out, results


def _table_rows(report: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the first markdown table in report.md."""
    lines = report.split("## Results", 1)[1].strip().splitlines()
    table = [ln for ln in lines[: next(i for i, ln in enumerate(lines) if not ln.startswith("|"))]]
    split = lambda ln: [c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]]
    return split(table[0]), [split(ln) for ln in table[2:]]


def test_report_has_one_row_per_variant_with_expected_columns(compared):
    _, out, results = compared
    header, rows = _table_rows((out / "report.md").read_text())
    assert [r[0] for r in rows] == ["baseline", "xl", "xl+infini"]
    for col in ["params", "train tok/s", "infer tok/s", "state/stream", "loss", "ppl",
                "bits/byte", "loss 0-2K", "passkey@320", "sorting@12"]:
        assert col in header
    # cells are the raw results, formatted
    for row, v in zip(rows, results["variants"]):
        cell = dict(zip(header, row))
        assert float(cell["loss"]) == pytest.approx(v["eval"]["loss"], abs=1e-4)
        assert float(cell["loss 0-2K"]) == pytest.approx(
            v["eval"]["by_position"]["0-2K"]["loss"], abs=1e-4)
        mean_pk = float(np.mean(v["passkey"]["accuracy"][0]))
        assert cell["passkey@320"] == f"{mean_pk:.0%}"
        assert cell["sorting@12"] == f"{v['sorting']['12']['accuracy']:.1%}"
    for png in ["loss_by_position.png", "loss_diff.png", "gates.png", "sorting.png",
                "passkey-baseline.png", "passkey-xl.png", "passkey-xl+infini.png"]:
        assert (out / png).stat().st_size > 1000, png
    assert not (out / "memory_sweep.png").exists()  # no kNN variant: no sweep plot


def test_results_json_fields_and_measurements(compared, tiny_corpus):
    from memformers.cli import load_trained_model
    from memformers.data.corpus import CorpusSplit
    from memformers.evaluate.lm import evaluate_lm

    _, out, _ = compared
    saved = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in saved["variants"]] == ["baseline", "xl", "xl+infini"]
    by = {v["name"]: v for v in saved["variants"]}
    for v in saved["variants"]:
        assert v["trained"] and not v["cached"]
        assert v["train"]["step"] == 5 and v["train"]["tokens_per_s"] > 0
        assert v["eval"]["tokens_per_s"] == pytest.approx(
            v["eval"]["tokens"] / v["eval"]["seconds"])
        assert 1200 <= v["eval"]["tokens"] < 1200 + 2 * 32 and v["eval"]["documents"] == 2
        assert Path(v["run_dir"]).name == f"{v['name']}-{v['config_hash']}"
        assert (Path(v["run_dir"]) / "results.json").is_file()
        assert 0.0 <= v["sorting"]["12"]["accuracy"] <= 1.0
        assert math.isfinite(v["sorting"]["12"]["loss"])
    # parameters and state footprint against the models themselves
    xl_cfg, xl_model, _ = load_trained_model(Path(by["xl"]["run_dir"]), device="cpu")
    assert by["xl"]["static"]["params"] == sum(p.numel() for p in xl_model.parameters())
    assert by["baseline"]["static"]["state_bytes_per_stream"] == 0
    layers, heads, seg, hd = 2, 4, 32, 8  # XL cache: k and v of one segment, + valid flags
    assert by["xl"]["static"]["state_bytes_per_stream"] == layers * (2 * heads * seg * hd * 4
                                                                     + seg)
    assert by["xl+infini"]["static"]["state_bytes_per_stream"] > \
        by["xl"]["static"]["state_bytes_per_stream"]
    assert list(by["xl+infini"]["static"]["gates"]) == ["blocks.1"]
    assert len(by["xl+infini"]["static"]["gates"]["blocks.1"]) == heads
    assert by["xl"]["static"]["gates"] == {}
    # the harness evaluated the saved weights: an independent evaluation agrees
    split = CorpusSplit.open(tiny_corpus, "valid")
    ref = evaluate_lm(xl_model, split, np.ones(256), batch_size=2, segment_len=32,
                      max_docs=2, max_tokens=1200, progress=False)
    assert ref["loss"] == pytest.approx(by["xl"]["eval"]["loss"], rel=1e-6)
    # per-token loss difference: baseline minus xl on the longest evaluated document
    diff = saved["loss_diff"]
    assert (diff["a"], diff["b"]) == ("baseline", "xl")
    longest = int(np.argmax([split.doc_len(i) for i in range(2)]))
    assert diff["doc"] == longest
    a = np.array(by["baseline"]["eval"]["doc_losses"]["losses"])
    b = np.array(by["xl"]["eval"]["doc_losses"]["losses"])
    assert np.allclose(diff["diff"], (a - b)[: len(diff["diff"])], atol=2e-4)
    gains = [w["diff"] for w in diff["winners"]]
    assert gains == sorted(gains, reverse=True) and all(g > 0 for g in gains)
    assert gains[0] == pytest.approx(float(np.max(a - b)), abs=2e-4)


def test_rerun_is_cached_and_a_changed_variant_retrains_alone(compared, tiny_corpus):
    cfg_file, out, first = compared
    stamps = {v["name"]: (Path(v["run_dir"]) / "model.safetensors").stat().st_mtime_ns
              for v in first["variants"]}
    again = run_compare(load_compare_config(cfg_file), out, progress=False, log=lambda s: None)
    assert all(v["cached"] and not v["trained"] for v in again["variants"])
    for v in again["variants"]:
        assert (Path(v["run_dir"]) / "model.safetensors").stat().st_mtime_ns == stamps[v["name"]]
        old = next(o for o in first["variants"] if o["name"] == v["name"])
        assert v["eval"]["loss"] == old["eval"]["loss"]

    changed = cfg_file.with_name("changed.toml")
    changed.write_text(_toml(tiny_corpus, xl_extra=', "model.rel_max_distance=64"'))
    third = run_compare(load_compare_config(changed), out, progress=False, log=lambda s: None)
    status = {v["name"]: (v["trained"], v["cached"]) for v in third["variants"]}
    assert status == {"baseline": (False, True), "xl": (True, False),
                      "xl+infini": (False, True)}
    new_xl = next(v for v in third["variants"] if v["name"] == "xl")
    old_xl = next(v for v in first["variants"] if v["name"] == "xl")
    assert new_xl["config_hash"] != old_xl["config_hash"]
    assert new_xl["config"]["model"]["rel_max_distance"] == 64


def test_changed_eval_settings_reevaluate_without_retraining(compared):
    cfg_file, out, _ = compared
    text = cfg_file.read_text().replace("passkey_samples = 2", "passkey_samples = 1")
    other = cfg_file.with_name("fewer-samples.toml")
    other.write_text(text)
    res = run_compare(load_compare_config(other), out, only=["baseline"], progress=False,
                      log=lambda s: None)
    base = next(v for v in res["variants"] if v["name"] == "baseline")
    assert not base["trained"] and base["recomputed"] == ["passkey"]
    assert base["passkey"]["samples_per_cell"] == 1
    # --only: the other variants are reported from their caches, not re-run
    assert [v["name"] for v in res["variants"]] == ["baseline", "xl", "xl+infini"]


def test_interrupted_run_resumes_from_its_checkpoint(compared):
    from safetensors.torch import load_file

    cfg_file, out, first = compared
    run_dir = Path(next(v for v in first["variants"] if v["name"] == "baseline")["run_dir"])
    weights = load_file(str(run_dir / "model.safetensors"))
    lines = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "model.safetensors").unlink()  # as if killed after the last checkpoint
    (run_dir / "results.json").unlink()
    res = run_compare(load_compare_config(cfg_file), out, only=["baseline"], progress=False,
                      log=lambda s: None)
    v = res["variants"][0]
    assert v["trained"] and v["train"]["resumed"] and v["train"]["step"] == 5
    assert (run_dir / "metrics.jsonl").read_text() == lines  # no step was trained again
    again = load_file(str(run_dir / "model.safetensors"))
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_a_failing_part_keeps_training_and_earlier_parts(tiny_corpus, tmp_path, monkeypatch):
    import memformers.evaluate.passkey as passkey

    cfg_file = tmp_path / "one.toml"
    cfg_file.write_text(_toml(tiny_corpus, '[[variant]]\nname = "baseline"\n'))
    real = passkey.evaluate_passkey

    def broken(*a, **k):
        raise RuntimeError("passkey crashed")

    monkeypatch.setattr(passkey, "evaluate_passkey", broken)
    with pytest.raises(RuntimeError, match="passkey crashed"):
        run_compare(load_compare_config(cfg_file), tmp_path / "out", progress=False,
                    log=lambda s: None)
    monkeypatch.setattr(passkey, "evaluate_passkey", real)
    res = run_compare(load_compare_config(cfg_file), tmp_path / "out", progress=False,
                      log=lambda s: None)
    v = res["variants"][0]
    assert not v["trained"] and v["recomputed"] == ["passkey", "sorting"]
    assert v["passkey"]["lengths"] == [320]


def test_cli_handler_prints_table_and_writes_report(compared, capsys, tmp_path):
    cfg_file, out, _ = compared
    parser = argparse.ArgumentParser()
    add_compare_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", str(cfg_file), "--out", str(out), "--no-progress",
                              "--only", "xl,baseline"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "report written to" in text and "xl+infini" in text
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("variant"))
    table = lines[start:start + 2 + 3]
    assert table[0].split()[:3] == ["variant", "params", "train"]
    assert len({len(line) for line in table}) == 1  # fixed width
    args = parser.parse_args(["compare", str(cfg_file), "--only", "nope"])
    with pytest.raises(MemformersError, match="unknown key 'nope' in --only"):
        args.func(args)


def _raw(**over) -> dict:
    raw = {"compare": {"name": "x"}, "variant": [{"name": "a"}, {"name": "b"}]}
    raw.update(over)
    return raw


@pytest.mark.parametrize("raw, message", [
    (_raw(varaint=[]), "unknown key 'varaint' in the compare config (did you mean 'variant'?)"),
    (_raw(compare={"name": "x", "sett": []}), "unknown key 'sett' in [compare] (did you mean "
                                              "'set'?)"),
    (_raw(eval={"passkey_length": [64]}), "unknown key 'passkey_length' in [eval] (did you "
                                          "mean 'passkey_lengths'?)"),
    (_raw(variant=[{"name": "a"}, {"set": []}]), "variant 2 has no name"),
    (_raw(variant=[{"name": "a"}, {"name": "a"}]), "two variants are named 'a'"),
    (_raw(variant=[{"name": "a", "initfrom": "x"}]), "unknown key 'initfrom' in variant 'a' "
                                                     "(did you mean 'init_from'?)"),
    (_raw(variant=[{"name": "a", "set": ["model.n_layer=2"]}]),
     "variant 'a': unknown config key 'model.n_layer' (did you mean 'model.n_layers'?)"),
    (_raw(variant=[{"name": "a", "set": ["model.knn.layers=[9]"]}]),
     "variant 'a': model.knn.layers: layer 9 does not exist"),
    (_raw(variant=[]), "at least one [[variant]]"),
    (_raw(compare={}), "compare.name"),
    (_raw(eval={"passkey_depths": [2.0]}), "eval.passkey_depths must be numbers in [0, 1]"),
    (_raw(eval={"loss_diff": ["a", "c"]}), "unknown key 'c' in eval.loss_diff"),
    (_raw(compare={"name": "x", "set": ["train.steps"]}), "expected key=value"),
    (_raw(eval={"memory_sweep": [0, 8], "memory_sweep_xl": ["off", "no"]}),
     'eval.memory_sweep_xl must be "on", "off" or both'),
    (_raw(eval={"memory_sweep_xl": ["off"]}), "eval.memory_sweep_xl needs eval.memory_sweep"),
    (_raw(eval={"memory_sweep": [0, 8], "loss_diff_capacities": [0, 16]}),
     "eval.loss_diff_capacities must be two capacities of eval.memory_sweep"),
])
def test_config_validation_errors_are_one_line(raw, message):
    with pytest.raises(MemformersError) as e:
        compare_config_from_dict(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_too_short_passkey_fails_before_training(tiny_corpus, tmp_path):
    cfg_file = tmp_path / "short.toml"
    cfg_file.write_text(_toml(tiny_corpus).replace("passkey_lengths = [320]",
                                                   "passkey_lengths = [64]"))
    with pytest.raises(MemformersError, match="eval.passkey_lengths: passkey length 64 is "
                                              "too short"):
        run_compare(load_compare_config(cfg_file), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "runs").exists()


def test_base_table_and_overrides_order(tmp_path):
    (tmp_path / "base.toml").write_text("[model]\nn_layers = 3\nd_model = 64\n")
    raw = _raw(compare={"name": "x", "base_config": "base.toml", "set": ["model.d_model=96"]},
               base={"model": {"n_layers": 5}},
               variant=[{"name": "a", "set": ["model.d_model=128"]},
                        {"name": "b", "init_from": "base.toml"}])
    cfg_path = tmp_path / "c.toml"
    cc = compare_config_from_dict(raw, cfg_path, cli_set=["train.steps=7"])
    from memformers.compare.spec import variant_config

    a, b = (variant_config(cc, v) for v in cc.variants)
    assert (a.model.n_layers, a.model.d_model, a.train.steps) == (5, 128, 7)
    assert (b.model.n_layers, b.model.d_model, b.train.steps) == (5, 96, 7)
    assert (a.train.init_from, b.train.init_from) == ("", str(tmp_path / "base.toml"))


def _fake_variant(name: str, losses: list[float] | None, **extra) -> dict:
    ev = {"loss": 1.0, "ppl": math.e, "bpb": 1.4, "tokens": 10, "documents": 1,
          "by_position": {"0-2K": {"loss": 1.0}}}
    if losses is not None:
        ev["doc_losses"] = {"doc": 0, "losses": losses}
    return {"name": name, "eval": ev, **extra}


def test_loss_pair_defaults_to_the_memory_sweep_extremes():
    sweep = [{"capacity": c, "loss": 1.0, "doc_losses": {"doc": 0, "losses": ls}}
             for c, ls in [(8192, [1.0, 1.0, 0.2]), (0, [1.0, 2.0, 1.0]), (1536, [1, 1, 1])]]
    results = {"eval": {"winners": 2},
               "variants": [_fake_variant("xl", [5.0, 5.0, 5.0]),
                            _fake_variant("xl+knn", [1.0, 1.0, 1.0], memory_sweep=sweep)]}
    a, _, b, _ = choose_loss_pair(results)
    assert (a, b) == ("xl+knn@0", "xl+knn@8192")
    diff = loss_difference(results)
    assert diff["diff"] == pytest.approx([0.0, 1.0, 0.8])
    assert [w["position"] for w in diff["winners"]] == [2, 3]  # gains 1.0 then 0.8
    results["eval"]["loss_diff_capacities"] = [1536, 8192]  # two chosen capacities
    assert choose_loss_pair(results)[::2] == ("xl+knn@1536", "xl+knn@8192")
    results["eval"]["loss_diff"] = ["xl+knn", "xl"]  # explicit pair wins
    assert loss_difference(results)["diff"] == pytest.approx([-4.0, -4.0, -4.0])


def test_loss_pair_of_a_sweep_with_the_xl_cache_on_and_off():
    def point(cap, xl, losses):
        return {"capacity": cap, "xl_cache": xl, "doc_losses": {"doc": 0, "losses": losses}}

    sweep = [point(0, False, [3.0]), point(64, False, [1.0]), point(0, True, [2.0]),
             point(64, True, [1.5])]
    knn = _fake_variant("knn", [1.0], memory_sweep=sweep,
                        config={"model": {"xl_cache": True}})
    results = {"eval": {}, "variants": [knn]}
    assert choose_loss_pair(results)[::2] == ("knn@0", "knn@64")  # as trained: XL on
    assert loss_difference(results)["diff"] == pytest.approx([0.5])
    knn["memory_sweep"] = sweep[:2]  # only XL off was swept: labelled as such
    assert choose_loss_pair(results)[::2] == ("knn@0 XL off", "knn@64 XL off")


def test_report_survives_missing_optional_parts(tmp_path):
    results = {"name": "bare", "eval": {}, "variants": [_fake_variant("only", None)]}
    report = write_report(results, tmp_path)
    text = report.read_text()
    assert "| only |" in text and "Passkey" not in text and "gates" not in text.lower()
    assert "## Sorting" not in text
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["loss_by_position.png"]
    assert json.loads((tmp_path / "results.json").read_text())["loss_diff"] is None
    assert "only" in print_table(results)


def test_sorting_section_and_plot_when_sorting_results_exist(tmp_path):
    def sorting(*accuracies):
        return {str(t): {"length": t, "accuracy": a, "loss": 1.5, "train_seconds": 60.0}
                for t, a in zip((4096, 1024, 2048), accuracies)}  # keys in no particular order
    results = {"name": "sorting", "eval": {"sorting_steps": 300, "sorting_samples": 64},
               "variants": [_fake_variant("xl", None, sorting=sorting(0.2, 0.6, 0.4)),
                            _fake_variant("xl+continuous", None, sorting=sorting(0.5, 0.6, 0.55)),
                            _fake_variant("no-sorting", None)]}
    text = write_report(results, tmp_path).read_text()
    assert (tmp_path / "sorting.png").stat().st_size > 1000
    section = text.split("## Sorting", 1)[1].split("\n## ", 1)[0]
    assert "![sorting](sorting.png)" in section and "300 steps" in section
    # one row per (variant, length), lengths in increasing order; none for no-sorting
    rows = [ln for ln in section.splitlines() if ln.startswith("| xl") or "no-sorting" in ln]
    assert rows[:3] == ["| xl | 1,024 | 60.0% | 1.5000 | 60 |",
                        "| xl | 2,048 | 40.0% | 1.5000 | 60 |",
                        "| xl | 4,096 | 20.0% | 1.5000 | 60 |"]
    assert len(rows) == 6
    assert json.loads((tmp_path / "results.json").read_text())["plots"]["sorting"] == \
        "sorting.png"


def test_report_lists_product_key_slot_usage(tmp_path):
    pkm = _fake_variant("xl+pkm", None)
    pkm["eval"]["pkm_usage"] = {"blocks.1.ffn": {"slots": 65536, "used": 0.8312,
                                                 "kl_uniform": 0.41, "slots_50": 9000,
                                                 "slots_90": 30000, "slots_99": 50000}}
    results = {"name": "pkm", "eval": {}, "variants": [_fake_variant("xl", None), pkm]}
    text = write_report(results, tmp_path).read_text()
    section = text.split("## Product-key slot usage", 1)[1].split("\n## ", 1)[0]
    assert "| xl+pkm | blocks.1.ffn | 65,536 | 83.1% | 0.4100 | 9,000 | 30,000 | 50,000 |" \
        in section
    assert "| xl |" not in section


class BruteForceMemory(AttentionMemory):
    """Stand-in kNN memory for the sweep plumbing: full softmax attention over the last
    ``capacity`` committed keys of the stream (i.e. exact kNN with k = capacity)."""

    def __init__(self, cfg, *, n_heads: int, head_dim: int, d_model: int):
        super().__init__()
        self.cfg, self.h, self.d = cfg, n_heads, head_dim
        self.gate = torch.nn.Parameter(torch.zeros(n_heads))
        self.k = self.v = self.valid = None

    def allocate(self, batch_size, device):
        self.k = torch.zeros(batch_size, self.h, 0, self.d, device=device)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)

    def reset(self, streams):
        self.valid = self.valid & ~streams[:, None]

    def state_tensors(self):
        return {} if self.k is None else {"k": self.k, "v": self.v, "valid": self.valid}

    def load_state_tensors(self, t):
        self.k, self.v, self.valid = t["k"], t["v"], t["valid"]

    def state_bytes_per_stream(self):
        return self.cfg.capacity * self.h * self.d * 2 * 4

    def gate_values(self):
        return torch.sigmoid(self.gate.detach())

    def forward(self, q, k, v, local_out, mask, commit):
        scores = q @ self.k.transpose(-1, -2) / self.d**0.5  # (B, H, L, N)
        scores = scores.masked_fill(~self.valid[:, None, None, :], float("-inf"))
        mem = torch.nan_to_num(torch.softmax(scores, -1)) @ self.v  # (B, H, L, d)
        g = torch.sigmoid(self.gate)[None, :, None, None]
        if commit:
            keep = self.cfg.capacity
            self.k = torch.cat([self.k, k.detach()], 2)[:, :, self.k.shape[2] + k.shape[2] - keep:]
            self.v = torch.cat([self.v, v.detach()], 2)[:, :, self.v.shape[2] + v.shape[2] - keep:]
            self.valid = torch.cat([self.valid, mask], 1)[:, self.valid.shape[1] + mask.shape[1]
                                                          - keep:]
        return g * mem + (1 - g) * local_out


def _knn_compare(tiny_corpus, tmp_path, sweep: str = "memory_sweep = [0, 64, 256]") -> dict:
    variants = ('[[variant]]\nname = "xl"\nset = ["model.xl_cache=true"]\n'
                '[[variant]]\nname = "xl+knn"\n'
                'set = ["model.xl_cache=true", "model.knn.layers=[1]", "model.knn.capacity=64"]\n')
    text = _toml(tiny_corpus, variants).replace("sorting_lengths = [12]", sweep)
    cfg_file = tmp_path / "knn.toml"
    cfg_file.write_text(text.replace("passkey_lengths = [320]", "passkey_lengths = []"))
    results = run_compare(load_compare_config(cfg_file), tmp_path / "out", progress=False,
                          log=lambda s: None)
    write_report(results, tmp_path / "out")
    return results


def _check_sweep(results: dict, out: Path) -> None:
    xl, knn = results["variants"]
    assert xl["memory_sweep"] is None  # only kNN variants are swept
    sweep = knn["memory_sweep"][:3]  # the XL cache on, as trained
    assert [(p["capacity"], p["xl_cache"]) for p in sweep] == [(0, True), (64, True), (256, True)]
    assert all("error" not in p and math.isfinite(p["loss"]) for p in sweep)
    trained = sweep[1]  # the capacity it was trained with reproduces its own evaluation
    assert trained["loss"] == pytest.approx(knn["eval"]["loss"], rel=1e-6)
    assert (out / "memory_sweep.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## Memory-size sweep" in report and "| xl+knn | on | 256 |" in report
    saved = json.loads((out / "results.json").read_text())
    assert (saved["loss_diff"]["a"], saved["loss_diff"]["b"]) == ("xl+knn@0", "xl+knn@256")
    a = np.array(sweep[0]["doc_losses"]["losses"])
    b = np.array(sweep[2]["doc_losses"]["losses"])
    assert np.allclose(saved["loss_diff"]["diff"], a - b, atol=2e-4)


def test_memory_sweep_with_a_brute_force_knn_stand_in(tiny_corpus, tmp_path, monkeypatch):
    fake = types.ModuleType("memformers.memory.knn")
    fake.KNNMemoryAttention = BruteForceMemory
    fake.knn_footprint_bytes = lambda *a, **k: 0
    monkeypatch.setitem(sys.modules, "memformers.memory.knn", fake)
    results = _knn_compare(tiny_corpus, tmp_path)
    _check_sweep(results, tmp_path / "out")
    sweep = results["variants"][1]["memory_sweep"]
    assert len({round(p["loss"], 6) for p in sweep}) == 3  # capacity changes the predictions
    assert results["variants"][1]["static"]["state_bytes_per_stream"] > \
        results["variants"][0]["static"]["state_bytes_per_stream"]


def test_knn_memory_sweep_with_the_xl_cache_on_and_off(tiny_corpus, tmp_path):
    pytest.importorskip("memformers.memory.knn")
    results = _knn_compare(tiny_corpus, tmp_path, "memory_sweep = [0, 64, 256]\n"
                                                  'memory_sweep_xl = ["on", "off"]')
    _check_sweep(results, tmp_path / "out")
    sweep = results["variants"][1]["memory_sweep"]
    on, off = sweep[:3], sweep[3:]
    assert [(p["capacity"], p["xl_cache"]) for p in off] == [(0, False), (64, False),
                                                             (256, False)]
    assert all(math.isfinite(p["loss"]) and p["loss"] != q["loss"] for p, q in zip(off, on))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| xl+knn | off | 256 |" in report


def test_trajectories_plot_draws_gates_memory_gain_and_key_staleness(tmp_path, monkeypatch):
    from memformers.compare import plots

    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": 10, "loss": 1.0, "gates": {"blocks.1": [0.1, 0.2]}},
            {"step": 20, "eval": {"loss": 1.0}, "eval_memory_off": {"loss": 1.1},
             "key_overlap": {"age_steps": 20, "blocks.1": [0.5, 0.7]}},
            {"step": 40, "eval": {"loss": 0.9}, "eval_memory_off": {"loss": 1.05},
             "key_overlap": {"age_steps": 20, "blocks.1": [0.8, 0.9]}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    drawn = {}
    real_save = plots._save

    def keep(fig, path):
        drawn["axes"] = fig.axes
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    out = plots.plot_memory_trajectories(
        {"variants": [{"name": "knn", "run_dir": str(run)}]}, tmp_path / "t.png")
    assert out is not None and out.is_file()
    staleness = drawn["axes"][3]
    assert len(staleness.lines) == 1 and np.allclose(staleness.lines[0].get_ydata(), [0.6, 0.85])
    gain = drawn["axes"][2].lines[0]
    assert np.allclose(gain.get_ydata(), [0.1, 0.15])
