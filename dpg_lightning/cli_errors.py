"""The parser's own errors, said the way the project's are: one line, the key, the fix.

jsonargparse reports a typo'd key, a value of the wrong type, a ``Literal`` choice it does not
know or a ``class_path`` that does not import as the whole usage (70+ lines) and a nested
"Does not validate against any of the Union subtypes" report. :class:`DPGArgumentParser` turns
each into a :class:`~dpg_lightning.common.errors.ConfigError` instead: the CLI prints it as
``error: <message>`` and exits 2, as it does for the config dataclasses' own checks. Typos get a
did-you-mean (:mod:`difflib`) over the keys or choices that exist at that place.

jsonargparse's messages are text, not data, so :func:`translate` reads them: a chain of
``Parser key "k":`` lines (the key, nested inside the values of typed groups), the branch of a
``Union`` that is not ``None``, and one last line that says what is wrong. A message it does not
recognise is still printed as one line, with its key when it names one.

The generator's optimizer is ``model.policy``'s (the module optimizes manually): LightningCLI's
``--optimizer``/``--lr_scheduler`` are switched off (``auto_configure_optimizers=False``), and
their unknown-key error says where the optimizer is set; :func:`check_trainer_flags` refuses
the Trainer flags that manual optimization ignores.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import inspect
import pkgutil
import re
import typing
from collections.abc import Iterable
from typing import Any, NoReturn

from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

from dpg_lightning.common.errors import ConfigError

#: Top-level flags that LightningCLI has and a DPG run does not, with what to use instead.
REPLACED = {
    "optimizer": "the generator's optimizer (AdamW) is set by `model.policy.lr`, "
                 "`model.policy.weight_decay` and `model.policy.betas`",
    "lr_scheduler": "the generator's learning rate and its schedule are set under "
                    "`model.policy` (`model.policy.lr`)",
}

_PARSER_KEY = re.compile(r'^\s*(?:- )?Parser key "([^"]+)":\s*(.*)$')
_CLASS_PATH = re.compile(r"^\s*(?:- )?Problem with given class_path '([^']+)':\s*$")
_NOISE = re.compile(
    r"^\s*(?:- )?(?:Does not validate against any of the Union subtypes|Subtypes:|Errors:|"
    r"Given value type:|Given value:|Expected a <class 'NoneType'>|Expected a path but)"
)
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.+)$")
_GROUP = re.compile(r"Group '([^']+)' does not accept option '([^']+)'")
_OPTION = re.compile(r"Option '([^']+)' is not accepted")
_EXPECTED = re.compile(r"Expected an? (.+?)\. Got value: (.*)$")
_NO_MODULE = re.compile(r"No module named '[^']+'|module '[^']+' has no attribute '[^']+'")
_DOT_PATH = re.compile(r"Expected a dot import path string: (.*)$")


class DPGArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose errors are one-line :class:`ConfigError`\\ s.

    Only the errors a user sees are translated: jsonargparse's inner parsers (``exit_on_error``
    off) raise theirs to the parser that tries the next ``Union`` branch, and
    ``JSONARGPARSE_DEBUG`` keeps the original report.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        from jsonargparse._common import debug_mode_active

        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)
        raise translate(message, self) from None


# ---------------------------------------------------------------- reading the message


def translate(message: str, parser: ArgumentParser | None = None) -> ConfigError:
    """The one-line :class:`ConfigError` for jsonargparse's ``message`` (see module doc)."""
    key, class_paths, last = "", {}, ""
    for line in message.splitlines():
        if not line.strip() or _NOISE.match(line):
            continue
        if m := _PARSER_KEY.match(line):
            key = _join(key, m[1])
            if m[2]:
                last = m[2]
                break
            continue
        if m := _CLASS_PATH.match(line):
            class_paths[key] = m[1]
            continue
        last = line.strip().removeprefix("- ")
        break
    return _leaf(key, last or message.strip(), class_paths, parser)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _leaf(key: str, what: str, class_paths: dict[str, str],
          parser: ArgumentParser | None) -> ConfigError:
    """The error for the last line ``what`` of a message about ``key``."""
    if m := _UNRECOGNIZED.search(what):
        flag, _, value = m[1].split()[0].lstrip("-").partition("=")
        value = value or (m[1].split()[1] if len(m[1].split()) > 1 else "")
        return unknown_key(_join(key, flag), value, class_paths, parser)
    if m := _GROUP.search(what):
        return unknown_key(_join(key, f"{m[1]}.{m[2]}"), "", class_paths, parser)
    if m := _OPTION.search(what):
        return unknown_key(_join(key, m[1]), "", class_paths, parser)
    if (m := _EXPECTED.search(what)) and "Literal[" in m[1]:
        return bad_choice(key, m[2], _literal_choices(m[1]))
    if m := _EXPECTED.search(what):
        return ConfigError(
            f"`{key}` is {m[2]!r}; it must be {_type_name(m[1])}", key)
    if m := _NO_MODULE.search(what):
        given = class_paths.get(key, "")
        example = _example_class(key, parser, given)
        close = given and did_you_mean(given, [example.strip("`")])
        fix = f"did you mean {example}?" if close else f"give an importable class, e.g. {example}"
        return ConfigError(
            f"`{key}.class_path` is {given!r}, which does not import ({m[0]}); {fix}", key)
    if m := _DOT_PATH.search(what):
        fields = sorted(_field_types(_option_type(key, parser)))
        if fields:
            return ConfigError(
                f"`{key}` is {m[1]!r}, but it holds settings, not a value: give its keys "
                f"(`{key}.{fields[0]}`, ...: {', '.join(fields)})", key)
        return ConfigError(
            f"`{key}` is {m[1]!r}; give a class as `class_path: package.module.Class` "
            f"(e.g. {_example_class(key, parser, m[1])}) or the path of a YAML file", key)
    flat = " ".join(what.split())
    return ConfigError(f"`{key}`: {flat}" if key else flat, *([key] if key else []))


def _literal_choices(type_text: str) -> list[str]:
    inside = type_text[type_text.index("Literal[") + len("Literal["):type_text.rindex("]")]
    try:
        return [str(c) for c in ast.literal_eval(f"[{inside}]")]
    except (ValueError, SyntaxError):
        return [c.strip(" '\"") for c in inside.split(",")]


def _type_name(text: str) -> str:
    """``<class 'int'>`` -> ``an int``; other annotations without ``typing.``."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text).replace("typing.", "")
    article = "an" if text[:1].lower() in "aeiou" else "a"
    return f"{article} {text}"


# ---------------------------------------------------------------- the three kinds


def did_you_mean(word: str, options: Iterable[str]) -> str | None:
    """The closest of ``options`` to ``word`` (a typo), or ``None`` when none is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return close[0] if close else None


def bad_choice(key: str, value: str, choices: list[str]) -> ConfigError:
    """A ``Literal`` setting given a value it does not have."""
    guess = did_you_mean(value, choices)
    hint = f"did you mean `{guess}`? " if guess else ""
    return ConfigError(
        f"`{key}` is {value!r}; {hint}use one of {' | '.join(choices)}", key)


def unknown_key(key: str, value: str, class_paths: dict[str, str] | None = None,
                parser: ArgumentParser | None = None) -> ConfigError:
    """A key that is no setting: what exists next to it, or what replaced it."""
    given = f" (given {value!r})" if value else ""
    if key.split(".")[0] in REPLACED:
        fix = REPLACED[key.split(".")[0]]
        return ConfigError(f"`{key}` is not a DPG setting{given}: {fix}", key)
    parent, _, name = key.rpartition(".")
    options = children(parent, class_paths or {}, parser)
    guess = did_you_mean(name, options)
    where = f"under `{parent}`" if parent else "at the top"
    if guess:
        fix = f"did you mean `{_join(parent, guess)}`?"
    elif options:
        listed = ", ".join(sorted(options)[:20]) + (", ..." if len(options) > 20 else "")
        fix = f"the keys {where} are: {listed}"
    elif parent in (class_paths or {}):
        fix = f"`{class_paths[parent]}` takes no settings"  # type: ignore[index]
    else:
        fix = f"`--help` lists the keys {where}"
    return ConfigError(f"`{key}` is not a setting{given}; {fix}", key)


# ---------------------------------------------------------------- the keys that exist


def children(parent: str, class_paths: dict[str, str],
             parser: ArgumentParser | None) -> list[str]:
    """The names directly under ``parent``: from the parser's options where it has them,
    else from the fields of the class that the typed option above ``parent`` holds."""
    keys = _option_keys(parser) if parser is not None else {}
    prefix = f"{parent}." if parent else ""
    direct = {k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)}
    direct.discard("help")
    if direct:
        return sorted(direct)
    parts = parent.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        cls: Any = None
        if head in class_paths:
            cls = _import(class_paths[head])
        elif head in keys:
            cls = getattr(keys[head], "_typehint", None)
        if cls is None:
            continue
        for part in parts[i:]:
            cls = _field_types(cls).get(part)
        return sorted(_field_types(cls)) if cls is not None else []
    return []


def _option_keys(parser: ArgumentParser) -> dict[str, Any]:
    """``{key: action}`` of ``parser`` and, for the main parser, of the subcommand it runs."""
    found: dict[str, Any] = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                found[option[2:]] = action
        names = getattr(action, "_name_parser_map", None)
        if names:
            args = getattr(parser, "args", None) or []
            chosen = [names[a] for a in args if a in names] or list(names.values())[:1]
            found.update(_option_keys(chosen[0]))
    return found


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _field_types(tp: Any) -> dict[str, Any]:
    """``{name: annotation}`` of a dataclass's fields or a class's ``__init__`` parameters
    (an ``X | None`` annotation stands for ``X``)."""
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), None)
    if not inspect.isclass(tp):
        return {}
    try:
        hints = typing.get_type_hints(tp if dataclasses.is_dataclass(tp) else tp.__init__)
    except Exception:  # an annotation that does not resolve: names only
        hints = {}
    if dataclasses.is_dataclass(tp):
        return {f.name: hints.get(f.name) for f in dataclasses.fields(tp)}
    params = inspect.signature(tp.__init__).parameters.values()
    return {p.name: hints.get(p.name) for p in params if p.name != "self"
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _option_type(key: str, parser: ArgumentParser | None) -> Any:
    """The annotation of option ``key`` (``None`` when the parser has no such option)."""
    action = _option_keys(parser).get(key) if parser is not None else None
    return getattr(action, "_typehint", None)


def _example_class(key: str, parser: ArgumentParser | None, given: str = "") -> str:
    """An importable class for ``key``: of the loaded classes of its type, the one closest to
    what was ``given`` (a typo'd module), else the first by name."""
    hint = _option_type(key, parser)
    bases = [a for a in (typing.get_args(hint) or (hint,))
             if inspect.isclass(a) and a is not type(None)]
    if not bases:
        return "`package.module.Class`"
    for base in bases:  # the project's own classes of that type, loaded or not
        package = base.__module__.rpartition(".")[0]
        if package.startswith("dpg_lightning."):
            for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
                try:
                    importlib.import_module(f"{package}.{info.name}")
                except Exception:  # noqa: BLE001 - a module that fails to load offers nothing
                    pass
    found, todo = set(), list(bases)
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if not inspect.isabstract(cls) and not cls.__module__.startswith(("tests", "__main__")):
            found.add(f"{cls.__module__}.{cls.__qualname__}")
    concrete = sorted(found - {f"{b.__module__}.{b.__qualname__}" for b in bases}) or sorted(found)
    return f"`{did_you_mean(given, concrete) or concrete[0]}`" if concrete else (
        "`package.module.Class`")


# ---------------------------------------------------------------- Lightning's flags


def add_replaced_flags(parser: ArgumentParser) -> None:
    """``optimizer``/``lr_scheduler`` as keys that take only ``null``: the config.yaml that
    earlier runs saved holds ``optimizer: null`` and must still load (a value is refused by
    :func:`check_replaced_flags`, once parsed)."""
    for key in REPLACED:
        parser.add_argument(f"--{key}", type=Any, default=None, help=f"not used: {REPLACED[key]}")


def check_replaced_flags(config: Any) -> None:
    """Refuse a value for a flag of :data:`REPLACED` (a DPG run would ignore it)."""
    for key, fix in REPLACED.items():
        value, name = config.get(key), key
        if hasattr(value, "key") and hasattr(value, "val"):  # --optimizer.lr=0.1
            value, name = value.val, f"{key}.{value.key}"
        if value is not None:
            raise ConfigError(f"`{name}` is not a DPG setting (given {value!r}): {fix}", name)


# ---------------------------------------------------------------- Trainer flags


def check_trainer_flags(trainer: Any) -> None:
    """Refuse the Trainer flags that a manually optimized module ignores (Lightning would stop
    only once the models are built, or, for some, not at all)."""
    if trainer is None:
        return
    clip = trainer.get("gradient_clip_val")
    if clip not in (None, 0, 0.0):
        raise ConfigError(
            f"`trainer.gradient_clip_val` is {clip!r}, but the generator is optimized "
            "manually and Lightning does not clip it; set `model.policy.max_grad_norm` "
            f"(e.g. `model.policy.max_grad_norm: {clip}`) and remove the trainer flag",
            "trainer.gradient_clip_val")
    algorithm = trainer.get("gradient_clip_algorithm")
    if algorithm not in (None, "norm"):
        raise ConfigError(
            f"`trainer.gradient_clip_algorithm` is {algorithm!r}; the generator's gradients "
            "are clipped by norm with `model.policy.max_grad_norm`: remove the trainer flag",
            "trainer.gradient_clip_algorithm")
    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate not in (None, 1):
        raise ConfigError(
            f"`trainer.accumulate_grad_batches` is {accumulate!r}, but each DPG step makes "
            "its own update from its rollouts; remove it (`model.policy.micro_batch_size` "
            "splits a step's backward for memory without changing the update)",
            "trainer.accumulate_grad_batches")
