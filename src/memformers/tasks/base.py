"""The task interface: what a model is trained on and how it is measured.

In the spirit of torchtitan's TrainSpec, a task is the few things that differ between
training on long documents, fine-tuning on passkey prompts or learning to sort:

* ``next_window()``   the batch source: the next BPTT window of every stream, a list of
                      ``runner.Segment`` (CPU tensors). A segment's ``targets`` say which
                      positions are scored (-100 elsewhere); ``grad=False`` segments only
                      fill the per-stream state.
* the loss            summed next-token cross-entropy over the scored positions
                      (``SegmentRunner.loss``), the same for every task;
* ``evaluate()``      the task's metrics of a model (held-out loss by position,
                      passkey accuracy, ...), and ``format_result()`` / ``write_result()``
                      to show and keep them;
* ``held_out_segments(n)``  the first ``n`` held-out segments of every stream, for
                      probes between training steps (e.g. the kNN key staleness); a
                      task without held-out streams returns [];
* ``state_dict()`` / ``load_state_dict()``  where the batch source stands, so a resumed
                      run continues exactly (JSON-able, written with every checkpoint).

The trainer (``train.trainer``) only ever talks to a task through these methods;
``build_task`` picks the one ``task.name`` names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memformers.runner import Segment, SegmentRunner


class Task:
    """Base class of the tasks; see the module docstring."""

    name = "task"

    def next_window(self) -> list[Segment]:
        raise NotImplementedError

    def held_out_segments(self, n: int) -> list[Segment]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def evaluate(self, runner: SegmentRunner, *, progress: bool = True) -> dict:
        raise NotImplementedError

    def format_result(self, result: dict) -> str:
        return json.dumps(result)

    def write_result(self, result: dict, run_dir: Path) -> None:
        """Keep an evaluation's result in the run directory (eval.json)."""
        from memformers.train.checkpoint import atomic_write_text

        atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))


TASKS = {
    "lm": "memformers.tasks.lm:LMTask",
    "passkey": "memformers.tasks.passkey:PasskeyTask",
}


def build_task(cfg, tokenizer, *, rank: int = 0, world_size: int = 1) -> Task:
    """The task ``cfg.task.name`` names, built from the run config ``cfg``."""
    import importlib

    module, cls = TASKS[cfg.task.name].split(":")
    return getattr(importlib.import_module(module), cls).from_config(
        cfg, tokenizer, rank=rank, world_size=world_size)
