"""scripts/retrofit_common.py: the gap the retrofit experiments report."""

import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from retrofit_common import report  # noqa: E402


def ev(loss):
    return {"loss": loss, "tokens": 10, "by_position": {"0-2K": {"loss": loss}}}


def rows(retro, scratch, control):
    return {"(a) base": ev(3.0), "(b) retrofit": ev(retro), "(c) kNN from scratch": ev(scratch),
            "(d) control": ev(control), "(c) after P steps": ev(9.0)}


def test_gap_closed_is_the_share_of_control_minus_scratch(tmp_path, capsys):
    out = report(tmp_path, types.SimpleNamespace(a=1), 100, 10, rows(1.7, 1.6, 2.0), "loss",
                 "nats/token", 1.0)
    assert abs(out["gap"] - 0.4) < 1e-12 and abs(out["gap_closed"] - 0.75) < 1e-12
    assert json.loads((tmp_path / "results.json").read_text())["gap_closed"] == out["gap_closed"]
    assert "gap closed by the retrofit: 75%" in capsys.readouterr().out


def test_no_gap_when_memory_from_scratch_does_not_beat_the_control(tmp_path, capsys):
    out = report(tmp_path, types.SimpleNamespace(), 100, 10, rows(1.9, 2.1, 2.0), "loss",
                 "nats/token", 1.0)
    assert out["gap_closed"] is None and "undefined" in capsys.readouterr().out
