"""Prompts for the generator: where they come from and the endless, resumable stream of them.

A prompt source (``data.prompt_file``) is a ``.txt`` file (one prompt per line), a ``.jsonl``
file or a ``.parquet`` file (the prompt in field/column ``data.prompt_field``), or a Hugging
Face ``datasets`` hub name (``org/name``, split ``data.prompt_split``): the paper's prompts are
Wikipedia passages stored as parquet, and users with hub access can name the dataset itself.
Each prompt is then wrapped in ``data.prompt_template`` (e.g. ``Rephrase this article:
{text}``), so the passages need not be rewritten into a prompt file first.

Training batches are ``num_prompts`` prompts per rank drawn with a seeded generator (an
infinite stream: a DPG run is measured in steps, not epochs). Global batch ``t`` is a pure
function of ``(seed, t)``, so nothing but ``t`` needs checkpointing and resuming continues
with exactly the prompts the uninterrupted run would have drawn. With several ranks, global
batch ``t`` has ``num_prompts x world_size`` prompts and rank ``r`` takes the ``r``-th share, so
the ranks' prompts together are one draw. No Lightning here: the data module
(:mod:`dpg_lightning.data`) serves this stream.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from dpg_lightning.errors import ConfigError, check_int_at_least, require
from dpg_lightning.seeds import derive_seed
from dpg_lightning.textfiles import existing_file, read_lines, read_text

#: Local prompt files by extension (anything else must be a hub dataset name).
FILE_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
_KINDS_HINT = "a .txt (one prompt per line), .jsonl or .parquet file, or a hub dataset `org/name`"
#: The placeholder a prompt template must contain.
TEXT = "{text}"


@dataclass
class PromptSets:
    """The training prompts (the stream draws from them) and the fixed validation prompts."""

    train: list[str]
    val: list[str]


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


def read_text_prompts(path: str, key: str = "data.prompt_file") -> list[str]:
    """Prompts, one per line (a literal ``\\n`` inside a prompt stands for a newline)."""
    return [line.replace("\\n", "\n") for line in read_lines(path, key, "prompt")]


def read_jsonl_prompts(path: str, field: str, key: str = "data.prompt_file") -> list[str]:
    """Field ``field`` of each JSON object, one object per line (blank lines are skipped)."""
    text = read_text(path, key, "a .jsonl file with one JSON object per line")
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"`{key}: {path}` line {number}"
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
                f"per line with the prompt in field `data.prompt_field: {field}`"
            )
        if field not in record:
            raise ConfigError(
                f"{where} has no field `data.prompt_field: {field}` (its fields: "
                f"{', '.join(map(str, record)) or 'none'}); set data.prompt_field to the field "
                "that holds the prompt"
            )
        prompts.append(_string(record[field], where, field))
    return _nonempty(prompts, key, path)


def read_parquet_prompts(path: str, field: str, key: str = "data.prompt_file") -> list[str]:
    """Column ``field`` of a parquet file (read alone: passages files carry other columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = existing_file(path, key, "a .parquet file")
    try:
        schema = pq.read_schema(file)
    except (pa.ArrowException, OSError) as err:
        raise ConfigError(
            f"`{key}: {path}` cannot be read as parquet ({err}); point it at a parquet file"
        ) from None
    if field not in schema.names:
        raise ConfigError(
            f"`data.prompt_field: {field}` is not a column of `{key}: {path}` (its columns: "
            f"{', '.join(schema.names)}); set data.prompt_field to the column that holds the "
            "prompt"
        )
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)):
        raise ConfigError(
            f"`data.prompt_field: {field}` of `{key}: {path}` holds {kind}, not text; set "
            "data.prompt_field to a string column"
        )
    values = pq.read_table(file, columns=[field]).column(field).to_pylist()
    rows = (_string(v, f"`{key}: {path}` row {i} (from 0)", field) for i, v in enumerate(values))
    return _nonempty(rows, key, path)


def read_hub_prompts(
    name: str,
    field: str,
    split: str,
    config: str | None = None,
    key: str = "data.prompt_file",
    split_key: str = "data.prompt_split",
) -> list[str]:
    """Column ``field`` of split ``split`` of hub dataset ``name`` (``datasets.load_dataset``).

    Any failure to load (no such dataset, config or split, no hub access) becomes one message
    naming the keys to change, with the library's own reason.
    """
    import datasets

    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the library's many errors all mean "these settings do not load"
        also = f", `data.prompt_config: {config}`" if config is not None else ""
        raise ConfigError(
            f"`{key}: {name}` (`{split_key}: {split}`{also}) could not be loaded with "
            f"datasets.load_dataset: {type(err).__name__}: {err}. Check the name, the split "
            "and data.prompt_config (a dataset with several configurations needs one), and "
            "hub access (HF_HUB_OFFLINE, HF_TOKEN), or point the key at a local .txt, .jsonl "
            "or .parquet file"
        ) from None
    columns = list(data.column_names)
    if field not in columns:
        raise ConfigError(
            f"`data.prompt_field: {field}` is not a column of `{key}: {name}` (its columns: "
            f"{', '.join(columns)}); set data.prompt_field to the column that holds the prompt"
        )
    where = f"`{key}: {name}` ({split_key}: {split}) row"
    rows = (_string(v, f"{where} {i} (from 0)", field) for i, v in enumerate(data[field]))
    return _nonempty(rows, key, name)


def _string(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(
            f"{where}: `data.prompt_field: {field}` is {type(value).__name__} {value!r:.40}, "
            "not a string; every prompt must be text"
        )
    return value


def _nonempty(prompts: Iterable[str], key: str, source: str) -> list[str]:
    """The non-blank prompts (blank ones are skipped, as blank lines of a .txt file are)."""
    kept = [p for p in prompts if p.strip()]
    if not kept:
        raise ConfigError(f"`{key}: {source}` holds no prompts (it is empty); give a source "
                          "with at least one non-blank prompt")
    return kept


def read_prompts(
    source: str,
    field: str = "text",
    split: str = "train",
    config: str | None = None,
    key: str = "data.prompt_file",
    split_key: str = "data.prompt_split",
) -> list[str]:
    """The prompts of one source, read as its kind (:func:`source_kind`) says."""
    kind = source_kind(source, key)
    if kind == "txt":
        return read_text_prompts(source, key)
    if kind == "jsonl":
        return read_jsonl_prompts(source, field, key)
    if kind == "parquet":
        return read_parquet_prompts(source, field, key)
    return read_hub_prompts(source, field, split, config, key, split_key)


def apply_template(prompts: list[str], template: str) -> list[str]:
    """Each prompt put in place of ``{text}`` (other braces are kept literally)."""
    return [template.replace(TEXT, p) for p in prompts]


def check_text_setting(key: str, value: Any) -> None:
    """A setting that must be a non-empty string."""
    require(isinstance(value, str) and value.strip() != "",
            f"`{key}` is {value!r}; it must be a non-empty string")


def load_prompts(
    prompt_file: str,
    num_prompts: int = 8,
    val_num_prompts: int = 16,
    seed: int = 0,
    prompt_field: str = "text",
    prompt_split: str = "train",
    prompt_config: str | None = None,
    prompt_template: str = TEXT,
    val_prompt_file: str | None = None,
    val_prompt_split: str | None = None,
) -> PromptSets:
    """Check the data settings (``data.*``, the data module's arguments) and read the prompts.

    One function for the data module and for the CLI's check before anything is built, so a
    data mistake fails before any model is. The validation prompts are the first
    ``val_num_prompts`` prompts of ``val_prompt_file`` (or, without one, of the training
    source), cycled if there are fewer.
    """
    check_int_at_least("data.num_prompts", num_prompts, 1)
    check_int_at_least("data.val_num_prompts", val_num_prompts, 1)
    check_int_at_least("data.seed", seed, 0)
    check_text_setting("data.prompt_file", prompt_file)
    check_text_setting("data.prompt_field", prompt_field)
    check_text_setting("data.prompt_split", prompt_split)
    if prompt_config is not None:
        check_text_setting("data.prompt_config", prompt_config)
    require(
        isinstance(prompt_template, str) and TEXT in prompt_template,
        f"`data.prompt_template` is {prompt_template!r}; it must contain {TEXT} where the "
        "prompt goes, e.g. 'Rephrase this article: {text}'",
    )
    if val_prompt_file is None:
        require(
            val_prompt_split is None,
            f"`data.val_prompt_split` is {val_prompt_split!r} but there is no "
            "data.val_prompt_file; set data.val_prompt_file or remove val_prompt_split",
        )
    else:
        check_text_setting("data.val_prompt_file", val_prompt_file)
        if val_prompt_split is not None:
            check_text_setting("data.val_prompt_split", val_prompt_split)
    train = apply_template(
        read_prompts(prompt_file, prompt_field, prompt_split, prompt_config), prompt_template
    )
    val_source = train
    if val_prompt_file is not None:
        val_split, split_key = prompt_split, "data.prompt_split"
        if val_prompt_split is not None:
            val_split, split_key = val_prompt_split, "data.val_prompt_split"
        raw = read_prompts(val_prompt_file, prompt_field, val_split, prompt_config,
                           "data.val_prompt_file", split_key)
        val_source = apply_template(raw, prompt_template)
    val = [val_source[i % len(val_source)] for i in range(val_num_prompts)]
    return PromptSets(train, val)


class PromptStream(IterableDataset):
    """Endless batches of ``batch_size`` prompts sampled with replacement, resumable.

    Batch ``t`` is drawn by a generator seeded with ``(seed, t)`` alone, so the stream can start
    at any ``start`` without replaying earlier draws. ``rank``/``world_size`` select this rank's
    share of global batch ``t`` (``batch_size x world_size`` prompts).
    """

    def __init__(
        self,
        prompts: list[str],
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size

    def batch(self, t: int) -> list[str]:
        """This rank's prompts of global batch ``t``."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "prompts", t))
        idx = torch.randint(len(self.prompts), (self.batch_size * self.world_size,), generator=gen)
        mine = idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return [self.prompts[i] for i in mine.tolist()]

    def __iter__(self) -> Iterator[list[str]]:
        t = self.start
        while True:
            yield self.batch(t)
            t += 1


def prompts_digest(prompts: list[str]) -> str:
    """A short hash of the prompts, so a resume can tell that they are the same."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
