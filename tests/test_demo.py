"""demo.py: the memory ladder's table (the demo itself runs in CI as `demo --quick`)."""

from memformers.demo import CONTROL, format_ladder
from memformers.evaluate.lm import bootstrap_change


def _eval(loss: float, late_loss: float) -> dict:
    """An evaluate_lm-like result: 4 documents of 100 tokens, 60 of them past 2K."""
    docs = {str(d): [loss * 100, 100] for d in range(4)}
    late = {str(d): [late_loss * 60, 60] for d in range(4)}
    return {"loss": loss, "tokens": 400, "documents": 4, "by_doc": docs,
            "by_doc_late": {"from": 2048, "docs": late},
            "by_position": {"0-2K": {"loss": loss}, "2K-8K": {"loss": late_loss}}}


def test_the_ladder_shows_the_change_beyond_2k_against_the_control():
    base, control, memory = _eval(1.0, 0.8), _eval(1.1, 1.0), _eval(0.99, 0.9)
    rows = [{"name": "demo-base (no fine-tune)", "eval": base, "change": (0.0, 0.0, 0.0),
             "late_vs_control": bootstrap_change(control, base, late=True)},
            {"name": CONTROL, "eval": control, "change": bootstrap_change(base, control),
             "late_vs_control": None},
            {"name": "xl+knn, memory on", "eval": memory, "change": bootstrap_change(base, memory),
             "late_vs_control": bootstrap_change(control, memory, late=True)}]
    lines = format_ladder(rows)
    memory_line = next(line for line in lines if "memory on" in line)
    assert "-1.0% [-1.0, -1.0]" in memory_line  # whole documents against demo-base
    assert memory_line.rstrip().endswith("-10.0% [-10.0, -10.0]")  # 0.9 vs 1.0 beyond 2K
    control_line = next(line for line in lines if line.strip().startswith(CONTROL))
    assert control_line.rstrip().endswith("+10.0% [+10.0, +10.0]")  # no column against itself
    assert "-20.0% [-20.0, -20.0]" in lines[1]  # the base beyond 2K: 0.8 vs 1.0


def test_learned_memory_eval_rejects_bad_runs_and_corpora_in_one_line(tmp_path):
    """scripts/learned_memory_eval.py (the demo's ladder on the issue's protocol): a
    directory that is not a run, or a --corpus that is not a corpus, is refused before
    any evaluation, with one line on stderr and exit status 2, and writes nothing."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "learned_memory_eval.py"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"knn": {"capacity": 16}}}))
    out = tmp_path / "out.json"
    cases = [(["--control", str(tmp_path / "missing"), "--memory", str(run)], "--control"),
             (["--control", str(run), "--memory", str(tmp_path)], "--memory"),
             (["--control", str(run), "--memory", str(run), "--corpus", str(tmp_path)],
              "--corpus"),
             (["--control", str(run), "--memory", str(run), "--reuse", str(run / "config.json")],
              "--reuse")]
    for args, flag in cases:
        r = subprocess.run([sys.executable, str(script), *args, "--out", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {flag} "), r.stderr
        assert not out.exists()


def test_learned_memory_eval_reuses_only_the_base_rows_of_a_matching_record(tmp_path):
    """--reuse copies the rows that read neither run (demo-base, alone or with a memory)
    of the requested splits from an earlier record of the same memory settings, corpus
    and document length, keeps rows already there, and refuses any other record."""
    import importlib.util
    import json
    from pathlib import Path

    import pytest

    script = Path(__file__).resolve().parent.parent / "scripts" / "learned_memory_eval.py"
    spec = importlib.util.spec_from_file_location("learned_memory_eval", script)
    lme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lme)

    def record(splits):
        return {"control": "a", "memory": "b", "knn": ["model.knn.capacity=16"],
                "corpus": None, "doc_tokens": 32768, "splits": splits}

    earlier = tmp_path / "earlier.json"
    old = record({"test": {"demo-base": _eval(1.0, 0.8), "XL control": _eval(2.0, 2.0)},
                  "valid": {"demo-base": _eval(3.0, 3.0)}})
    del old["corpus"]  # records from before --corpus scored the runs' own corpus
    earlier.write_text(json.dumps(old))
    now = record({"test": {"demo-base": _eval(0.5, 0.5)}})
    lme.reuse_base_rows(now, str(earlier), ["test", "valid", "train"], ["demo-base"])
    assert now["splits"]["test"] == {"demo-base": _eval(0.5, 0.5)}  # kept; no run's rows
    assert now["splits"]["valid"] == {"demo-base": _eval(3.0, 3.0)}
    assert now["splits"]["train"] == {}
    assert now["reused"] == str(earlier)

    for key, value in (("doc_tokens", 4096), ("corpus", "runs/unseen/corpus-perl")):
        other = record({})
        other[key] = value
        with pytest.raises(SystemExit) as e:
            lme.reuse_base_rows(other, str(earlier), ["test"], ["demo-base"])
        assert e.value.code == 2


def test_learned_memory_eval_resumes_without_rescoring_and_keeps_provenance(tmp_path,
                                                                           monkeypatch):
    """Rerun with the same runs and --out, the script scores only the models the record
    lacks (here the --knnlm rows), keeps the others' figures, and keeps the --reuse source
    of the base rows; a record of other runs is started afresh."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "learned_memory_eval.py"
    spec = importlib.util.spec_from_file_location("learned_memory_eval", script)
    lme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lme)
    for name in ("control", "memory"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(
            json.dumps({"model": {"knn": {"capacity": 16, "layers": [1]}}}))
    scored = []

    def fake_eval(run, sets, split, **kw):
        scored.append((Path(run).name, tuple(sets), split))
        return _eval(1.0 + 0.01 * len(scored), 0.9)

    monkeypatch.setattr(lme, "evaluate_source", fake_eval)
    out = tmp_path / "out.json"
    argv = ["x", "--control", str(tmp_path / "control"), "--memory", str(tmp_path / "memory"),
            "--splits", "test", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    lme.main()
    first = json.loads(out.read_text())
    assert len(scored) == 5  # demo-base alone and with the memory, control, off, on
    first["reused"] = "earlier.json"
    out.write_text(json.dumps(first))

    monkeypatch.setattr(sys, "argv", [*argv, "--knnlm"])
    lme.main()
    second = json.loads(out.read_text())
    assert len(scored) == 8 and all(lme.KNNLM in sets for _, sets, _ in scored[5:])
    assert second["reused"] == "earlier.json"
    for name, row in first["splits"]["test"].items():
        assert second["splits"]["test"][name] == row

    monkeypatch.setattr(sys, "argv", [*argv, "--doc-tokens", "4096"])
    lme.main()  # another document length: nothing is kept
    assert len(scored) == 13 and "reused" not in json.loads(out.read_text())
