"""Every ``python -m dpg_lightning plan ...`` command a config's header tells the user to run
succeeds as written, on whatever machine runs the tests (a login node, a laptop, CI): the
plan answers about the training node, so this machine's memory and disk must not decide it.

The commands are read from the leading comment block of every YAML file under ``configs/`` and
run in-process (no model is built; each takes about a second).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from dpg_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "python -m dpg_lightning plan"


def _header(path: Path) -> list[str]:
    """The comment lines before the first line of YAML, without ``#``, continuations joined."""
    lines: list[str] = []
    for raw in path.read_text().splitlines():
        if not raw.lstrip().startswith("#"):
            break
        text = raw.lstrip()[1:].strip()
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1].rstrip() + " " + text
        else:
            lines.append(text)
    return lines


def header_commands() -> list[tuple[Path, str]]:
    """``(config, command)`` for every ``plan`` command in a config header."""
    found = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        for line in _header(path):
            if PREFIX in line:
                found.append((path, line[line.index(PREFIX):].strip().strip("`")))
    return found


COMMANDS = header_commands()


def test_the_configs_name_plan_commands():
    """The paper configs tell the user to plan first; without commands this file tests
    nothing."""
    paper = {path.name for path, _ in COMMANDS if path.parent.name == "paper"}
    assert paper == {p.name for p in (ROOT / "configs" / "paper").glob("*.yaml")}


@pytest.mark.parametrize(
    "config,command", COMMANDS, ids=[str(p.relative_to(ROOT / "configs")) for p, _ in COMMANDS]
)
def test_a_header_plan_command_exits_0_as_written(config, command, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = shlex.split(command)[len(PREFIX.split()) - 1:]  # ["plan", ...]
    try:
        main(argv)
    except SystemExit as exit_info:
        err = capsys.readouterr().err
        pytest.fail(f"`{command}` exited {exit_info.code}: {err}")
    out = capsys.readouterr().out
    assert "one DPG step" in out and ": fits" in out, out
