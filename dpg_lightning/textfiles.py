"""Reading line-per-entry text inputs (prompts, UUID and passage files, pretraining corpora).

Kept free of Lightning so objectives and pretraining can use it from plain Python.
"""

from __future__ import annotations

from pathlib import Path


def read_lines(path: str, key: str, what: str = "line") -> list[str]:
    """Non-empty lines of a text file; a missing or empty file is an error naming ``key``.

    One reader for every line-per-entry input (prompts, UUID/passage files, pretraining
    corpora), so they fail the same way, at start-up, with the config key to fix.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"`{key}: {path}` does not exist (relative paths start at {Path.cwd()}); "
            f"point it at a text file with one {what} per line"
        )
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"`{key}: {path}` has no {what}s (it is empty); write one {what} per line")
    return lines
