"""The model table a run prints at its start: Lightning's, less what says nothing about DPG.

Lightning's default summary (``RichModelSummary`` when ``rich`` is installed, else
``ModelSummary``) adds a ``Mode`` column with its train/eval module counts and a ``FLOPs``
column with its total. In a DPG module every module is in eval mode on purpose (no dropout in
rollouts or the inner SFT), and FLOPs are counted only from an ``example_input_array``, which a
module holding a generator and a target has not: the column always reads 0. The table keeps
Lightning's rows, parameter counts and model size.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import (
    _format_summary_table,
    get_formatted_model_size,
    get_human_readable_count,
)

#: Lightning's columns that :class:`ParameterSummary` leaves out.
LEFT_OUT = ("Mode", "FLOPs")

#: The closing lines of Lightning's table (after the size line) that go with those columns.
_MODE_AND_FLOPS_LINES = 3

# The summary goes where Lightning's goes, so a user's logging settings treat both alike.
log = logging.getLogger("lightning.pytorch.callbacks.model_summary")


class ParameterSummary(ModelSummary):
    """Lightning's plain model summary without its mode and FLOPs columns and totals."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        log.info("\n" + parameter_table(summary_data, total_parameters, trainable_parameters,
                                        model_size))


class RichParameterSummary(RichModelSummary):
    """Lightning's rich model summary (its default when ``rich`` is installed) without its
    mode and FLOPs columns and totals."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        columns = kept_columns(summary_data)
        for name, _ in columns:
            table.add_column(name, style="dim" if name == " " else None, no_wrap=name == "Name",
                             justify="right" if name.startswith("Params") else "left")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        for label, value in totals(total_parameters, trainable_parameters, model_size):
            console.print(f"[bold]{label}[/]: {value}")


def kept_columns(summary_data: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """``summary_data``'s columns less :data:`LEFT_OUT`."""
    return [(name, values) for name, values in summary_data if name not in LEFT_OUT]


def totals(total: int, trainable: int, model_size: float) -> list[tuple[str, str]]:
    """The parameter totals under Lightning's table, as it words and formats them."""
    return [
        ("Trainable params", get_human_readable_count(trainable)),
        ("Non-trainable params", get_human_readable_count(total - trainable)),
        ("Total params", get_human_readable_count(total)),
        ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
    ]


def parameter_table(
    summary_data: list[tuple[str, list[str]]],
    total_parameters: int,
    trainable_parameters: int,
    model_size: float,
) -> str:
    """Lightning's plain summary table of ``summary_data`` without the :data:`LEFT_OUT`
    columns or their totals."""
    table = _format_summary_table(total_parameters, trainable_parameters, model_size,
                                  {"train": 0, "eval": 0}, 0, *kept_columns(summary_data))
    return "\n".join(table.splitlines()[:-_MODE_AND_FLOPS_LINES])


def parameter_summary(callbacks: list[L.Callback]) -> ModelSummary | None:
    """The replacement of Lightning's model summary among ``callbacks`` (the trainer's
    default, or one a config lists), of the same kind and settings; ``None`` when there is
    none (``enable_model_summary: false``) or the summary is a class of the user's own, which
    is left alone."""
    for callback in callbacks:
        kind = {ModelSummary: ParameterSummary, RichModelSummary: RichParameterSummary}.get(
            type(callback))
        if kind is not None:
            return kind(max_depth=callback._max_depth, **callback._summarize_kwargs)
    return None
