"""Reading text entries from user-named sources: prompts, UUIDs, passages, corpora.

A source is a ``.txt`` file (one entry per line), a ``.jsonl`` file or a ``.parquet`` file (the
entry in a named field/column), or a Hugging Face ``datasets`` hub name (``org/name``, with a
split and optionally a configuration). Every reader checks its source the same way (exists, is
UTF-8, is not empty, has the field) so that a bad path fails at start-up with the config key to
fix, whatever the source holds: each reader takes :class:`SourceKeys`, the config keys of its
caller, and names them in its messages. Kept free of Lightning.
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpg_lightning.common.errors import ConfigError, require


@dataclass(frozen=True)
class SourceKeys:
    """The config keys a source is set by, for messages (the prompts' by default)."""

    source: str = "data.prompt_file"
    field: str = "data.prompt_field"
    split: str = "data.prompt_split"
    config: str = "data.prompt_config"


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


#: Local source files by extension (anything else must be a hub dataset name).
FILE_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
_KINDS_HINT = "a .txt (one entry per line), .jsonl or .parquet file, or a hub dataset `org/name`"


def source_kind(source: str, key: str = "data.prompt_file") -> str:
    """``txt``, ``jsonl``, ``parquet`` or ``hub``: how ``source`` is read.

    Decided by the extension; a name without one of ours is a hub dataset only if it could be
    one (``org/name``, not an existing local path, not a file name such as ``prompts.csv``), so
    that a typo or an unsupported file says so at once instead of becoming a hub lookup.
    """
    kind = FILE_KINDS.get(Path(source).suffix.lower())
    if kind is not None:
        return kind
    path = Path(source).expanduser()
    if path.exists():
        what = "a directory" if path.is_dir() else f"a {path.suffix or 'extension-less'} file"
        raise ConfigError(f"`{key}: {source}` is {what}; use {_KINDS_HINT}")
    if not _plausible_hub_name(source):
        raise ConfigError(
            f"`{key}: {source}` does not exist and is not a hub dataset name; use {_KINDS_HINT} "
            f"(relative paths start at {Path.cwd()})"
        )
    return "hub"


def _plausible_hub_name(name: str) -> bool:
    """``org/name`` that the hub accepts and that does not look like a file name."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1 or name.startswith(("/", ".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    # The built-in table only (no system mime.types), so the answer is the same on every machine.
    kind, encoding = mimetypes.MimeTypes().guess_type(name, strict=False)
    return kind is None and encoding is None


def read_text_entries(path: str, keys: SourceKeys = SourceKeys()) -> list[str]:
    """Entries, one per line (a literal ``\\n`` inside one stands for a newline)."""
    return [line.replace("\\n", "\n") for line in read_lines(path, keys.source, "entry")]


def read_jsonl_entries(path: str, field: str, keys: SourceKeys = SourceKeys()) -> list[str]:
    """Field ``field`` of each JSON object, one object per line (blank lines are skipped)."""
    text = read_text(path, keys.source, "a .jsonl file with one JSON object per line")
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"`{keys.source}: {path}` line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"{where} is not valid JSON ({err.msg}, column {err.colno}); write one JSON "
                "object per line"
            ) from None
        if not isinstance(record, dict):
            raise ConfigError(
                f"{where} is a JSON {type(record).__name__}, not an object; write one object "
                f"per line with the prompt in field `{keys.field}: {field}`"
            )
        if field not in record:
            raise ConfigError(
                f"{where} has no field `{keys.field}: {field}` (its fields: "
                f"{', '.join(map(str, record)) or 'none'}); set {keys.field} to the field "
                "that holds the prompt"
            )
        prompts.append(_string(record[field], where, field, keys.field))
    return _nonempty(prompts, keys.source, path)


def read_parquet_entries(path: str, field: str, keys: SourceKeys = SourceKeys()) -> list[str]:
    """Column ``field`` of a parquet file (read alone: passages files carry other columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = existing_file(path, keys.source, "a .parquet file")
    try:
        schema = pq.read_schema(file)
    except (pa.ArrowException, OSError) as err:
        raise ConfigError(
            f"`{keys.source}: {path}` cannot be read as parquet ({err}); point it at a parquet file"
        ) from None
    if field not in schema.names:
        raise ConfigError(
            f"`{keys.field}: {field}` is not a column of `{keys.source}: {path}` (its columns: "
            f"{', '.join(schema.names)}); set {keys.field} to the column that holds the "
            "prompt"
        )
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)):
        raise ConfigError(
            f"`{keys.field}: {field}` of `{keys.source}: {path}` holds {kind}, not text; set "
            "data.prompt_field to a string column"
        )
    values = pq.read_table(file, columns=[field]).column(field).to_pylist()
    rows = (_string(v, f"`{keys.source}: {path}` row {i} (from 0)", field, keys.field)
            for i, v in enumerate(values))
    return _nonempty(rows, keys.source, path)


def read_hub_entries(
    name: str,
    field: str,
    split: str,
    config: str | None = None,
    keys: SourceKeys = SourceKeys(),
) -> list[str]:
    """Column ``field`` of split ``split`` of hub dataset ``name`` (``datasets.load_dataset``).

    Any failure to load (no such dataset, config or split, no hub access) becomes one message
    naming the keys to change, with the library's own reason.
    """
    import datasets

    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the library's many errors all mean "these settings do not load"
        also = f", `{keys.config}: {config}`" if config is not None else ""
        raise ConfigError(
            f"`{keys.source}: {name}` (`{keys.split}: {split}`{also}) could not be loaded with "
            f"datasets.load_dataset: {type(err).__name__}: {err}. Check the name, the split "
            f"and {keys.config} (a dataset with several configurations needs one), and "
            "hub access (HF_HUB_OFFLINE, HF_TOKEN), or point the key at a local .txt, .jsonl "
            "or .parquet file"
        ) from None
    columns = list(data.column_names)
    if field not in columns:
        raise ConfigError(
            f"`{keys.field}: {field}` is not a column of `{keys.source}: {name}` (its columns: "
            f"{', '.join(columns)}); set {keys.field} to the column that holds the prompt"
        )
    where = f"`{keys.source}: {name}` ({keys.split}: {split}) row"
    rows = (_string(v, f"{where} {i} (from 0)", field, keys.field)
            for i, v in enumerate(data[field]))
    return _nonempty(rows, keys.source, name)


def _string(value: Any, where: str, field: str, field_key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(
            f"{where}: `{field_key}: {field}` is {type(value).__name__} {value!r:.40}, "
            "not a string; every entry must be text"
        )
    return value


def _nonempty(entries: Iterable[str], key: str, source: str) -> list[str]:
    """The non-blank entries (blank ones are skipped, as blank lines of a .txt file are)."""
    kept = [p for p in entries if p.strip()]
    if not kept:
        raise ConfigError(f"`{key}: {source}` holds no entries (it is empty); give a source "
                          "with at least one non-blank entry")
    return kept


def read_entries(
    source: str,
    field: str = "text",
    split: str = "train",
    config: str | None = None,
    keys: SourceKeys = SourceKeys(),
) -> list[str]:
    """The entries of one source, read as its kind (:func:`source_kind`) says."""
    kind = source_kind(source, keys.source)
    if kind == "txt":
        return read_text_entries(source, keys)
    if kind == "jsonl":
        return read_jsonl_entries(source, field, keys)
    if kind == "parquet":
        return read_parquet_entries(source, field, keys)
    return read_hub_entries(source, field, split, config, keys)




def read_entries_with_fallback(
    source: str | None,
    fallback: str | None,
    field: str,
    split: str,
    config: str | None,
    keys: SourceKeys,
    fallback_key: str,
) -> list[str]:
    """The entries of ``source``, or of the local ``fallback`` when ``source`` is a hub
    dataset that cannot be loaded from here (no network; offline and not cached).

    Lets one config name the paper's dataset for machines with hub access and a local copy
    for the others, without trying the hub for a minute first where it is out of reach.
    """
    from dpg_lightning.common.hub import hub_offline, hub_reachable

    if source is not None:
        hub = source_kind(source, keys.source) == "hub"
        if not hub or fallback is None:
            return read_entries(source, field, split, config, keys)
        if hub_offline() or hub_reachable():
            try:
                return read_entries(source, field, split, config, keys)
            except ConfigError:
                pass  # not loadable here (offline and not cached): the local copy
    require(fallback is not None,
            f"set `{keys.source}` (a dataset or file) or `{fallback_key}` (a local file)")
    return read_entries(fallback, field, split, config, SourceKeys(fallback_key, keys.field))
