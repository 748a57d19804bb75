"""Reading user-named input files (prompts, UUID and passage files, pretraining corpora).

Kept free of Lightning so objectives and pretraining can use it from plain Python. Every reader
checks the file the same way (exists, is UTF-8, is not empty) so that a bad path fails at
start-up with the config key to fix, whatever the file holds.
"""

from __future__ import annotations

from pathlib import Path

from dpg_lightning.errors import ConfigError


def existing_file(path: str, key: str, expected: str) -> Path:
    """``path`` as a :class:`Path`, or an error naming ``key`` and what to point it at.

    ``expected`` describes the file the key wants (e.g. "a text file with one prompt per line").
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"`{key}: {path}` does not exist (relative paths start at {Path.cwd()}); "
            f"point it at {expected}"
        )
    return file


def read_text(path: str, key: str, expected: str) -> str:
    """The UTF-8 text of an existing file; a missing or non-UTF-8 one is an error naming ``key``."""
    file = existing_file(path, key, expected)
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"`{key}: {path}` is not UTF-8 text (byte {err.start}: {err.reason}); save it as "
            "UTF-8, or point the key at the right file"
        ) from None


def read_lines(path: str, key: str, what: str = "line") -> list[str]:
    """Non-empty lines of a text file; a missing or empty file is an error naming ``key``.

    One reader for every line-per-entry input (prompts, UUID/passage files, pretraining
    corpora), so they fail the same way, at start-up, with the config key to fix.
    """
    text = read_text(path, key, f"a text file with one {what} per line")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(
            f"`{key}: {path}` has no {what}s (it is empty); write one {what} per line"
        )
    return lines
