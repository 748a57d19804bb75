"""`make test-fast` runs ``-m "not slow"``: the marks the tests use must be registered, so a
misspelt ``@pytest.mark.slwo`` fails here instead of putting a slow test into the edit loop."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}


def registered() -> set[str]:
    """The marks pyproject.toml registers (read as text: tomllib is Python 3.11+)."""
    listed = re.search(r"^markers\s*=\s*\[(.*?)\]", (ROOT / "pyproject.toml").read_text(),
                       re.M | re.S)
    assert listed, "pyproject.toml registers no pytest markers"
    return {m.split(":")[0].split("(")[0].strip() for m in re.findall(r'"([^"]*)"', listed[1])}


def marks(source: str) -> set[str]:
    """The names X of every ``pytest.mark.X`` in a file."""
    return {node.attr for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "mark" and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "pytest"}


def test_marks_are_registered():
    known = BUILTIN | registered()
    unknown = {f"{path.name}: {name}" for path in sorted((ROOT / "tests").glob("*.py"))
               for name in marks(path.read_text()) - known}
    assert not unknown, f"unregistered marks (add to pyproject markers, or fix): {unknown}"


def test_make_test_fast_deselects_the_slow_mark():
    make = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test-fast:.*\n((?:\t.*\n)+)", make, re.M)
    assert recipe and '-m "not slow"' in recipe[1], "make test-fast no longer skips slow tests"
    assert "slow" in registered()
    slow = [p.name for p in (ROOT / "tests").glob("*.py") if "slow" in marks(p.read_text())]
    assert slow, "no test is marked slow: make test-fast would run everything"


def test_marks_finds_a_misspelt_mark():
    source = "import pytest\n\n@pytest.mark.slwo\ndef test_x():\n    pass\n"
    assert marks(source) == {"slwo"} and "slwo" not in BUILTIN | registered()
