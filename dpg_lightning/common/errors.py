"""Errors a user can act on, and the small checks the config dataclasses share.

A :class:`RunError` is not a bug: the CLI prints its message (what went wrong and what to
change) without a Python traceback and exits with its ``exit_code``. A :class:`ConfigError` is
a mistake in what the user wrote (a key's value): the message names the key, the value and
what to use instead, and the exit status is 2 (as argparse's for a bad flag); it subclasses
``ValueError`` so that library callers can catch it like any other bad argument. A
:class:`TrainingDiverged` is a run that stopped producing finite numbers: status 1.

The config dataclasses call these checks from ``__post_init__``, so a bad value fails while
the command line is parsed, before any model is built.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any


class RunError(Exception):
    """An error the message fully explains: printed without a traceback, exit ``exit_code``."""

    exit_code = 1


class ConfigError(RunError, ValueError):
    """A setting that cannot work; the message says which key, its value and the fix."""

    exit_code = 2


class TrainingDiverged(RunError):
    """Training produced non-finite numbers for too long: the message says what diverged
    and which settings to lower."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` must be one of ``choices`` (dataclasses built in Python skip the parser)."""
    options = list(choices)
    require(value in options, f"`{key}` is {value!r}; use one of {' | '.join(map(str, options))}")


def check_positive(key: str, value: float | int, *, allow_zero: bool = False) -> None:
    """``value > 0`` (or ``>= 0`` with ``allow_zero``), else a message naming ``key``."""
    ok = value >= 0 if allow_zero else value > 0
    bound = ">= 0" if allow_zero else "> 0"
    require(ok, f"`{key}` is {value!r}; it must be {bound}")


def check_int_at_least(key: str, value: int, low: int, why: str = "") -> None:
    """An integer setting with a lower bound (``why`` explains the bound, if not obvious)."""
    require(
        isinstance(value, int) and value >= low,
        f"`{key}` is {value!r}; it must be an integer >= {low}{f' ({why})' if why else ''}",
    )


def check_regex(key: str, pattern: str) -> None:
    """``pattern`` must compile as a Python regular expression."""
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(
            f"`{key}: {pattern}` is not a valid regular expression ({err}); escape special "
            r"characters, e.g. `layers\.1\.`"
        ) from None
