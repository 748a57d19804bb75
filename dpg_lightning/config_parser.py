"""The parser of a run's config for the commands that use one but do not train.

``sample``, ``export`` and ``plan`` read the same YAML ``fit`` reads (also the ``config.yaml``
LightningCLI saves in a run directory): the model's and the data's settings with their types and
checks, and the rest of a training config accepted as it is, so that one file serves every
command.
"""

from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser

from dpg_lightning.datamodule import PromptDataModule
from dpg_lightning.module import DPGModule


def run_config_parser(command: str, description: str) -> ArgumentParser:
    """A parser of ``--config`` with ``model.*`` and ``data.*``; the trainer's and
    LightningCLI's other keys are accepted (``trainer`` as a dict, the rest ignored)."""
    parser = ArgumentParser(prog=f"python -m dpg_lightning {command}", description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="the training config (YAML)")
    parser.add_class_arguments(DPGModule, "model")
    parser.add_class_arguments(PromptDataModule, "data")
    for key in ("trainer", "optimizer", "lr_scheduler"):
        parser.add_argument(f"--{key}", type=dict | None, default=None,
                            help="the training config's (read where it matters)")
    parser.add_argument("--seed_everything", type=bool | int | None, default=None, help="ignored")
    parser.add_argument("--weights_only", type=bool | None, default=None, help="ignored")
    return parser
