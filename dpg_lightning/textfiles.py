"""Reading line-per-entry text inputs (prompts, UUID and passage files, pretraining corpora).

Kept free of Lightning so objectives and pretraining can use it from plain Python.
"""

from __future__ import annotations

from pathlib import Path

from dpg_lightning.errors import ConfigError


def read_lines(path: str, key: str, what: str = "line") -> list[str]:
    """Non-empty lines of a text file; a missing or empty file is an error naming ``key``.

    One reader for every line-per-entry input (prompts, UUID/passage files, pretraining
    corpora), so they fail the same way, at start-up, with the config key to fix.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"`{key}: {path}` does not exist (relative paths start at {Path.cwd()}); "
            f"point it at a text file with one {what} per line"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"`{key}: {path}` is not UTF-8 text (byte {err.start}: {err.reason}); save it as "
            "UTF-8, or point the key at the right file"
        ) from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(
            f"`{key}: {path}` has no {what}s (it is empty); write one {what} per line"
        )
    return lines
