"""Config dataclasses that check themselves: choices from their ``Literal`` annotations, keys
relative to themselves.

A config dataclass (``InnerConfig``, ``PolicyConfig``, ...) derives from :class:`Settings`.
When it is built, :func:`check_settings` runs: every field annotated ``Literal[...]`` (or
``Literal[...] | None``) must hold one of its choices, read from the annotation itself, so a
choice is written once; nested settings are checked again under their field's name (a nested
``replay`` whose ``k`` is bad reports ``replay.k``); then the class's own :meth:`Settings.check`
runs the rules an annotation cannot say (bounds, fields that exclude each other).

Errors name keys relative to the dataclass (``batch_size``): it does not know where the YAML
puts it, and the same class may sit at several places (``model.generator`` and
``model.target``). Whoever knows the place prefixes the error (:meth:`ConfigError.at`):
:func:`build_settings` for settings built from a parsed config, the CLI for the top level.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

from dpg_lightning.common.errors import ConfigError

S = TypeVar("S", bound="Settings")


@dataclasses.dataclass
class Settings:
    """Base of the config dataclasses: ``__post_init__`` runs :func:`check_settings`.

    A subclass overrides :meth:`check` (not ``__post_init__``) for its own rules, raising
    :class:`ConfigError` with keys relative to itself. The base is a (field-less) dataclass
    itself: jsonargparse treats a class as a plain dataclass (nested keys, no ``class_path``)
    only when every class of its MRO is one.
    """

    def __post_init__(self) -> None:
        check_settings(self)

    def check(self) -> None:
        """Rules beyond the ``Literal`` choices; may also normalise a field (a list to a
        tuple). Nothing by default."""


def literal_choices(hint: Any) -> tuple[Any, ...] | None:
    """The choices of a ``Literal[...]`` annotation (``None`` included for ``Literal | None``),
    or ``None`` when ``hint`` is no such annotation."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType):
        parts = [literal_choices(a) if a is not type(None) else (None,)
                 for a in typing.get_args(hint)]
        if all(p is not None for p in parts) and any(
            typing.get_origin(a) is Literal for a in typing.get_args(hint)
        ):
            return tuple(c for p in parts for c in p)  # type: ignore[union-attr]
    return None


def settings_class(hint: Any) -> type[Settings] | None:
    """The :class:`Settings` class of an annotation (``InnerConfig`` or ``InnerConfig | None``),
    or ``None``."""
    if isinstance(hint, type) and issubclass(hint, Settings):
        return hint
    return next((a for a in typing.get_args(hint)
                 if isinstance(a, type) and issubclass(a, Settings)), None)


def check_literal_args(fn: Any, **values: Any) -> None:
    """Check arguments of ``fn`` annotated ``Literal[...]`` against their annotation (a class's
    plain ``Literal`` init arguments, which no dataclass checks); keys are the argument names."""
    hints = typing.get_type_hints(fn)
    for name, value in values.items():
        choices = literal_choices(hints[name])
        if choices is not None and value not in choices:
            shown = " | ".join("null" if c is None else str(c) for c in choices)
            raise ConfigError(f"`{name}` is {value!r}; use one of {shown}", name)


def check_settings(obj: Settings) -> None:
    """Check ``obj``'s ``Literal`` fields against their annotation, its nested settings (errors
    re-keyed under the field) and its :meth:`Settings.check`; raise :class:`ConfigError` with
    keys relative to ``obj``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        choices = literal_choices(hints[f.name])
        if choices is not None and value not in choices:
            shown = " | ".join("null" if c is None else str(c) for c in choices)
            raise ConfigError(f"`{f.name}` is {value!r}; use one of {shown}", f.name)
        if isinstance(value, Settings):
            try:
                check_settings(value)
            except ConfigError as err:
                raise err.at(f.name) from None
    obj.check()


def build_settings(cls: type[S], value: Any = None, at: str = "", **defaults: Any) -> S:
    """``cls`` from a parsed config value (a mapping or a jsonargparse namespace; ``None``:
    ``cls(**defaults)``), nested settings built from their mappings too, so that every check
    runs as when the CLI builds it; errors are re-keyed under ``at`` (``model.inner``)."""
    try:
        if value is None:
            return cls(**defaults)
        if isinstance(value, cls):  # already built (a checkpoint's hyper-parameters)
            check_settings(value)
            return value
        data = dict(value.as_dict() if hasattr(value, "as_dict") else value)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            sub = settings_class(hints[f.name])
            if sub is not None and isinstance(data.get(f.name), Mapping):
                data[f.name] = build_settings(sub, data[f.name], at=f.name)
        return cls(**data)
    except ConfigError as err:
        raise err.at(at) from None


def check_init_settings(cls: type, values: Mapping[str, Any] | Any, at: str) -> None:
    """Build each :class:`Settings`-typed argument of ``cls.__init__`` found in ``values`` (a
    parsed config group: the init arguments by name) so that its errors name the full key,
    ``at.<argument>.<field>``: the CLI calls it before the parser builds the classes itself,
    whose errors would carry no place."""
    data = values.as_dict() if hasattr(values, "as_dict") else dict(values or {})
    for name, hint in typing.get_type_hints(cls.__init__).items():
        sub = settings_class(hint)
        if sub is not None and data.get(name) is not None:
            build_settings(sub, data[name], at=f"{at}.{name}")
