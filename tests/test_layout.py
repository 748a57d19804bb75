"""The package's layout holds: no import cycle, core math without Lightning, small files, and
``callbacks/`` observes ``dpg_lightning`` but is never imported by it.

The import graph is read from the source (every ``import`` statement, also inside functions:
a cycle through a function-level import is still a cycle), so a new cycle fails here before it
fails somewhere at import time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dpg_lightning"

#: The Lightning shell: the top-level modules (the module, the data module, the CLI and the
#: commands) and the run's lifecycle (``run/``). Every other folder of the package is core: it
#: imports without Lightning and never imports the shell.
SHELL_PACKAGES = {"run"}


def _unit(module: str) -> str:
    """The layer unit of a module: its sub-package (``dpg_lightning.inner``), or the module
    itself for a top-level module."""
    parts = module.split(".")
    if len(parts) >= 2 and (PACKAGE / parts[1]).is_dir():
        return ".".join(parts[:2])
    return module


def _is_core(module: str) -> bool:
    parts = module.split(".")
    return len(parts) >= 2 and (PACKAGE / parts[1]).is_dir() and parts[1] not in SHELL_PACKAGES


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """``dpg_lightning`` modules imported anywhere in ``path`` (``from pkg import submodule``
    counts as importing the submodule; a parent package's implicit import does not)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(path, known) - {name} for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def package_graph() -> dict[str, set[str]]:
    """The import graph between units (sub-packages and top-level modules)."""
    graph: dict[str, set[str]] = {}
    for name, deps in import_graph().items():
        unit = _unit(name)
        graph.setdefault(unit, set()).update(_unit(d) for d in deps if _unit(d) != unit)
    return graph


def test_no_package_level_import_cycle():
    cycle = find_cycle(package_graph())
    assert cycle is None, " -> ".join(cycle)


def test_core_never_imports_the_shell():
    """Core folders build on each other, never on the Lightning shell above them."""
    wrong = [f"{name} imports {dep}" for name, deps in import_graph().items() if _is_core(name)
             for dep in deps if not _is_core(dep) and dep != "dpg_lightning"]
    assert not wrong, wrong


def test_the_layers_are_folders():
    """Every sub-package but the shell's is core, and the shell's top level is small."""
    core = sorted({_unit(m) for m in import_graph() if _is_core(m)})
    assert len(core) >= 6, core
    top = [m for m in import_graph() if m.count(".") == 1 and not _is_core(m)]
    assert len(top) <= 10, top


def test_core_math_imports_without_lightning():
    """Every module of every core folder, in a fresh interpreter in which importing Lightning
    fails."""
    blocker = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning', 'lightning_fabric'):\n"
        "            raise ImportError(f'{name} is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    code = blocker + (
        "import importlib, traceback\n"
        f"for name in {sorted(m for m in import_graph() if _is_core(m))!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        print('FAILED', name, traceback.format_exc(limit=-2))\n"
        "print('lightning loaded:', [m for m in sys.modules if m.startswith('lightning')])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FAILED" not in proc.stdout and "lightning loaded: []" in proc.stdout, proc.stdout


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_no_file_over_500_lines(path):
    assert len(path.read_text().splitlines()) <= 500


def test_dpg_lightning_never_imports_callbacks():
    for file in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n == "callbacks" or n.startswith("callbacks.") for n in names), file
