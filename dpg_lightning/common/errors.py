"""Errors a user can act on, and the small checks the config dataclasses share.

A :class:`RunError` is not a bug: the CLI prints its message (what went wrong and what to
change) without a Python traceback and exits with its ``exit_code``. A :class:`ConfigError` is
a mistake in what the user wrote (a key's value): the message names the key, the value and
what to use instead, and the exit status is 2 (as argparse's for a bad flag); it subclasses
``ValueError`` so that library callers can catch it like any other bad argument. A
:class:`TrainingDiverged` is a run that stopped producing finite numbers: status 1.

A :class:`ConfigError` names its keys relative to the settings that raised it (a config
dataclass knows its fields, not where the YAML puts it): ``batch_size``, not
``model.inner.batch_size``. Whoever knows where the settings sit prefixes them with
:meth:`ConfigError.at` (a dataclass for its nested settings, the CLI for the top level), so the
same dataclass serves ``model.generator`` and ``model.target`` and core code never spells the
YAML's layout. Keys are written in backticks in the message (`` `batch_size` ``,
`` `backend: func` ``); only the keys the error was given are re-keyed, so backticked values and
examples stay as they are.

The config dataclasses call these checks from their ``check`` (see
:mod:`dpg_lightning.common.settings`), so a bad value fails while the command line is parsed,
before any model is built.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any


class RunError(Exception):
    """An error the message fully explains: printed without a traceback, exit ``exit_code``."""

    exit_code = 1


class ConfigError(RunError, ValueError):
    """A setting that cannot work; the message says which key, its value and the fix.

    ``keys`` are the keys the message names in backticks, the one at fault first (``key``);
    :meth:`at` prefixes them with where the settings sit.
    """

    exit_code = 2

    def __init__(self, message: str, *keys: str) -> None:
        super().__init__(message)
        self.message = message
        self.keys = keys

    @property
    def key(self) -> str | None:
        """The key at fault, or ``None`` for an error that names no key of its own."""
        return self.keys[0] if self.keys else None

    def at(self, prefix: str) -> ConfigError:
        """The same error with its keys under ``prefix`` (``batch_size`` at ``model.inner``:
        ``model.inner.batch_size``), in ``keys`` and in the message's backticks."""
        if not prefix or not self.keys:
            return self
        names = "|".join(re.escape(k) for k in sorted(set(self.keys), key=len, reverse=True))
        # a key opens a backtick span and ends it, or is followed by `: value` or a space
        message = re.sub(rf"`({names})(?=[`:\s])", lambda m: f"`{prefix}.{m[1]}", self.message)
        moved = type(self)(message, *(f"{prefix}.{k}" for k in self.keys))
        moved.__cause__ = self.__cause__
        return moved


class TrainingDiverged(RunError):
    """Training produced non-finite numbers for too long: the message says what diverged
    and which settings to lower."""


def require(condition: bool, message: str, *keys: str) -> None:
    """Raise :class:`ConfigError` with ``message`` naming ``keys`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message, *keys)


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` must be one of ``choices``; for settings that are no ``Literal`` field of a
    config dataclass (those are checked from their annotation, see
    :func:`dpg_lightning.common.settings.check_settings`)."""
    options = list(choices)
    require(value in options,
            f"`{key}` is {value!r}; use one of {' | '.join(map(str, options))}", key)


def check_positive(key: str, value: float | int, *, allow_zero: bool = False) -> None:
    """``value > 0`` (or ``>= 0`` with ``allow_zero``), else a message naming ``key``."""
    ok = value >= 0 if allow_zero else value > 0
    bound = ">= 0" if allow_zero else "> 0"
    require(ok, f"`{key}` is {value!r}; it must be {bound}", key)


def check_int_at_least(key: str, value: int, low: int, why: str = "") -> None:
    """An integer setting with a lower bound (``why`` explains the bound, if not obvious)."""
    require(
        isinstance(value, int) and value >= low,
        f"`{key}` is {value!r}; it must be an integer >= {low}{f' ({why})' if why else ''}",
        key,
    )


def check_regex(key: str, pattern: str) -> None:
    """``pattern`` must compile as a Python regular expression."""
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(
            f"`{key}: {pattern}` is not a valid regular expression ({err}); escape special "
            r"characters, e.g. `layers\.1\.`",
            key,
        ) from None
