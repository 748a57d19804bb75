"""The run's model table: Lightning's rows and totals without its mode and FLOPs columns.

Before: every run opened with Lightning's table, whose ``Mode`` column reads ``eval`` for every
module (on purpose in DPG) and whose ``FLOPs`` column and total read 0 (a DPG module has no
``example_input_array``). The CLI-level check is ``tests/test_cli.py``'s noise test.
"""

from __future__ import annotations

import logging
import re

import torch
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.model_summary import summarize

from dpg_lightning.run.model_summary import (
    ParameterSummary,
    RichParameterSummary,
    parameter_summary,
)


def _summary_args() -> tuple:
    model = BoringModel()
    model.frozen = torch.nn.Linear(3, 2).requires_grad_(False)
    summary = summarize(model, max_depth=1)
    return (summary._get_summary_data(), summary.total_parameters,
            summary.trainable_parameters, summary.model_size, summary.total_training_modes, 0)


def test_the_plain_table_keeps_rows_and_totals_without_mode_or_flops(caplog):
    with caplog.at_level(logging.INFO):
        ParameterSummary.summarize(*_summary_args())
    text = caplog.text
    assert "Name" in text and "layer" in text and "frozen" in text and "Params" in text
    assert "66        Trainable params" in text and "8         Non-trainable params" in text
    assert "Total estimated model params size (MB)" in text
    for gone in ("FLOPs", "Flops", "train mode", "eval mode"):
        assert gone not in text, gone
    assert not re.search(r"\bMode\b", text)


def test_the_rich_table_keeps_rows_and_totals_without_mode_or_flops(capsys):
    RichParameterSummary.summarize(*_summary_args())
    text = capsys.readouterr().out
    assert "frozen" in text and "Params" in text and "Trainable params: 66" in text
    assert "Non-trainable params: 8" in text
    for gone in ("FLOPs", "train mode", "eval mode"):
        assert gone not in text, gone
    assert not re.search(r"\bMode\b", text)


def test_lightnings_summary_is_replaced_in_kind_and_depth_and_a_users_own_is_kept():
    plain = parameter_summary([ModelSummary(max_depth=3)])
    rich = parameter_summary([RichModelSummary(max_depth=2, header_style="bold")])
    assert type(plain) is ParameterSummary and plain._max_depth == 3
    assert type(rich) is RichParameterSummary and rich._max_depth == 2
    assert rich._summarize_kwargs == {"header_style": "bold"}

    class Mine(ModelSummary):
        pass

    assert parameter_summary([Mine()]) is None and parameter_summary([]) is None
