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
(:mod:`dpg_lightning.datamodule`) serves this stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset

from dpg_lightning.common.errors import check_int_at_least, require
from dpg_lightning.common.seeds import derive_seed
from dpg_lightning.data.text_sources import SourceKeys, read_entries

#: The placeholder a prompt template must contain.
TEXT = "{text}"


@dataclass
class PromptSets:
    """The training prompts (the stream draws from them) and the fixed validation prompts."""

    train: list[str]
    val: list[str]


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
        read_entries(prompt_file, prompt_field, prompt_split, prompt_config), prompt_template
    )
    val_source = train
    if val_prompt_file is not None:
        val_split, split_key = prompt_split, "data.prompt_split"
        if val_prompt_split is not None:
            val_split, split_key = val_prompt_split, "data.val_prompt_split"
        keys = SourceKeys("data.val_prompt_file", split=split_key)
        raw = read_entries(val_prompt_file, prompt_field, val_split, prompt_config, keys)
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
