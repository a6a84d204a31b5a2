"""Every command of every ```bash block in README.md and docs/ is checked.

``python`` blocks run in tests/test_layers.py. Shell commands that train for hours cannot
run here, so each one is checked as far as it can be without doing the work:

- ``memformers ...`` (also under ``torchrun ... -m memformers``): the CLI parses the exact
  arguments, and the configs they name load and validate with their ``--set`` overrides
  (``train``, ``sorting``, ``compare``);
- ``python scripts/X.py`` / ``bash scripts/X.sh``: the script exists (Python: ``--help`` runs);
- ``pip install -c FILE``, ``bash .ci/run``: the files exist.

The cheap ones then really run, in an empty directory: building the corpora, the passkey
corpus, and generating from the shipped base with the kNN-LM. The main job, ``memformers
demo``, and the test command run in CI itself (.ci/run).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from memformers.cli import build_parser, main
from memformers.compare.spec import load_compare_config
from memformers.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def shell_commands(path: Path) -> list[str]:
    """The commands of a file's bash blocks: continuations joined, comments and the
    ``[optional]`` brackets removed (their content kept), ``&&`` chains split."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            line = re.sub(r"\[(--[^\]]*)\]", r"\1", line)
            out += [c.strip() for c in line.split("&&") if c.strip()]
    return out


def memformers_args(cmd: list[str]) -> list[str] | None:
    if cmd[0] == "memformers":
        return cmd[1:]
    if cmd[0] == "torchrun" and "-m" in cmd:
        i = cmd.index("-m")
        return cmd[i + 2:] if cmd[i + 1] == "memformers" else None
    return None


def check_memformers(args: list[str]) -> None:
    ns = build_parser().parse_args(args)  # SystemExit(2) on a stale option
    sets = getattr(ns, "set", []) or []
    if ns.command in ("train", "sorting") and getattr(ns, "config", None):
        load_config(ROOT / ns.config, sets)
    elif ns.command in ("train", "sorting") and not getattr(ns, "resume", False):
        load_config(None, sets)
    elif ns.command == "compare":
        load_compare_config(ROOT / ns.config, sets)


ALL = [(doc, c) for doc in DOCS for c in shell_commands(ROOT / doc)]


def test_the_docs_have_shell_commands():
    assert len(ALL) >= 30


@pytest.mark.parametrize("doc,command", ALL, ids=[f"{d}:{c[:60]}" for d, c in ALL])
def test_documented_command_is_valid(doc, command):
    cmd = shlex.split(command)
    args = memformers_args(cmd)
    if args is not None:
        check_memformers(args)
    elif cmd[0] == "pip":
        for i, a in enumerate(cmd):
            if a == "-c":
                assert (ROOT / cmd[i + 1]).is_file(), cmd[i + 1]
    elif cmd[0] in ("bash", "python"):
        script = ROOT / cmd[1]
        assert script.is_file(), f"{doc}: {cmd[1]} does not exist"
        if cmd[0] == "python" and script.suffix == ".py":
            r = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr[-500:]
    else:
        pytest.fail(f"{doc}: no check for '{cmd[0]}' commands: {command}")


RUN_FOR_REAL = [
    "memformers data build --group-by-package --split 0.8,0.1,0.1 --out data/stdlib-byte-grouped",
    "memformers data passkey --out data/passkey --docs 2000 --max-length 4096",
    'memformers generate demo-base --prompt "import os" --set model.knnlm.capacity=65536',
]


def test_the_cheap_documented_commands_run(tmp_path, monkeypatch, capsys):
    documented = {c for _, c in ALL}
    monkeypatch.chdir(tmp_path)
    for command in RUN_FOR_REAL:
        assert command in documented, f"no longer documented: {command}"
        assert main(shlex.split(command)[1:]) == 0, command
    assert (tmp_path / "data/stdlib-byte-grouped/manifest.json").is_file()
    assert (tmp_path / "data/passkey/manifest.json").is_file()
    assert "import os" in capsys.readouterr().out
