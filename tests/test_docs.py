"""Every ``dpg_lightning`` path the prose names resolves.

Docstrings and comments of the package, ``callbacks/``, ``benchmarks/`` and ``examples/``, the
YAML configs (their comments and ``class_path`` values) and every README*.md name modules as
``dpg_lightning.inner.replay`` or ``dpg_lightning.metrics.patterns.LMHeadPattern`` and files as
``dpg_lightning/inner/optim.py``. A move or a rename leaves such names stale, and nothing else
fails on them: here the module must import (or the file exist) and a trailing attribute exist.
"""

from __future__ import annotations

import ast
import importlib
import io
import re
import tokenize
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"runs", "lightning_logs", "wandb", "node_modules", "__pycache__", "results"}

DOTTED = re.compile(r"(?<![\w.])dpg_lightning(?:\.[A-Za-z_]\w*)+")
FILE = re.compile(r"(?<![\w./])dpg_lightning/[\w./]*")
FROM_IMPORT = re.compile(r"from (dpg_lightning[\w.]*) import \(?((?:\w+(?:, *)?)+)")


def _files(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.rglob(pattern)
                  if not any(part.startswith(".") or part in SKIP_DIRS
                             for part in p.relative_to(ROOT).parts[:-1]))


def _python_prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the comments and string literals (docstrings among them) of a file."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return [(t.start[0], t.string) for t in tokens
            if t.type in (tokenize.COMMENT, tokenize.STRING)]


def _class_paths(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return own + [p for value in node.values() for p in _class_paths(value)]
    if isinstance(node, list):
        return [p for value in node for p in _class_paths(value)]
    return []


def references() -> list[tuple[str, str]]:
    """(where, name) for every dotted path or file path the prose names."""
    found: list[tuple[str, str]] = []

    def scan(where: str, text: str) -> None:
        found.extend((where, m.group()) for m in DOTTED.finditer(text))
        found.extend((where, m.group()) for m in FILE.finditer(text))
        found.extend((where, f"{m[1]}.{name.strip()}") for m in FROM_IMPORT.finditer(text)
                     for name in m[2].split(",") if name.strip())

    for folder in ("dpg_lightning", "callbacks", "benchmarks", "examples"):
        for path in _files(ROOT / folder, "*.py"):
            for line, text in _python_prose(path):
                scan(f"{path.relative_to(ROOT)}:{line}", text)
    # The package docstring lists subpackages by their short names (``inner``, ``metrics``).
    doc = ast.get_docstring(ast.parse((ROOT / "dpg_lightning/__init__.py").read_text())) or ""
    found.extend(("dpg_lightning/__init__.py docstring", f"dpg_lightning.{name}")
                 for name in re.findall(r"``(\w+)``", doc))
    for path in _files(ROOT / "configs", "*.yaml"):
        rel = str(path.relative_to(ROOT))
        scan(rel, path.read_text())
        found.extend((f"{rel} class_path", p)
                     for p in _class_paths(yaml.safe_load(path.read_text())) if "." in p)
    for path in _files(ROOT, "README*.md"):
        scan(str(path.relative_to(ROOT)), path.read_text())
    return found


def resolve(name: str) -> str | None:
    """None when ``name`` resolves, else why not."""
    if "/" in name:
        path = name.rstrip(".")
        return None if (ROOT / path).exists() else f"no file {path}"
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        if parts[i - 1] == "__main__":  # importing it would run the CLI
            if (ROOT / (module.replace(".", "/") + ".py")).exists():
                return None if i == len(parts) else f"{name}: attribute of {module}"
            continue
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and module.startswith(e.name):
                continue  # this prefix is no module: try a shorter one
            return f"{name}: importing {module} fails ({e})"
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return f"{name}: {'.'.join(parts[:i])} has no {'.'.join(parts[i:])}"
            obj = getattr(obj, attr)
        return None
    return f"{name}: no module"


def test_named_paths_resolve():
    refs = references()
    assert len(refs) > 50, "the scan found (almost) nothing: the patterns or the folders moved"
    failures = sorted({f"{where}: {why}" for where, name in refs if (why := resolve(name))})
    assert not failures, "stale names in docs/comments:\n" + "\n".join(failures)


def test_resolve_reports_stale_names():
    """The check can fail: names that do not resolve are reported, real ones are not."""
    assert resolve("dpg_lightning.inner.replay") is None
    assert resolve("dpg_lightning.metrics.patterns.LMHeadPattern") is None
    assert resolve("dpg_lightning/inner/optim.py") is None
    assert resolve("dpg_lightning/inner/") is None
    assert resolve("dpg_lightning.__main__") is None
    assert resolve("dpg_lightning.no_such_module") is not None
    assert resolve("dpg_lightning.inner.replay.no_such_function") is not None
    assert resolve("dpg_lightning.optim.optimizer_step_") is not None
    assert resolve("dpg_lightning/no_such_file.py") is not None
    assert resolve("callbacks.NoSuchCallback") is not None
    assert DOTTED.findall("see `dpg_lightning.inner.replay.replay_rewards`.") == [
        "dpg_lightning.inner.replay.replay_rewards"]
    assert FILE.findall("in dpg_lightning/inner/optim.py:12, see") == [
        "dpg_lightning/inner/optim.py"]
    assert [f"{m[1]}:{m[2]}" for m in FROM_IMPORT.finditer("from dpg_lightning.x import a, b")] == [
        "dpg_lightning.x:a, b"]
