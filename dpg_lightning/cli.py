"""``python -m dpg_lightning fit --config configs/....yaml``: a thin LightningCLI.

Defaults that every DPG run needs are set here, so configs stay short: validation runs a plain
SFT and needs autograd (``inference_mode: false``), and the prompt stream is endless, so
validation is scheduled every ``val_check_interval`` steps rather than per epoch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from lightning.pytorch.cli import LightningCLI

from dpg_lightning.checkpoints import check_checkpoint_config
from dpg_lightning.data import PromptDataModule
from dpg_lightning.errors import ConfigError
from dpg_lightning.module import DPGModule
from dpg_lightning.preflight import check_run
from dpg_lightning.shared_sft import close_process_group


class DPGCLI(LightningCLI):
    """LightningCLI that reports where a finished run put its outputs."""

    def _parse_ckpt_path(self) -> None:
        """Refuse a ``--ckpt_path`` of another model instead of silently adopting its config.

        LightningCLI replaces the model config with the checkpoint's hyper-parameters; for a
        checkpoint of a different model that would quietly resume *that* model.
        """
        sub = self.config.get("subcommand")
        given = self.config[sub].get("model") if sub else None
        given = given.clone() if hasattr(given, "clone") else None
        super()._parse_ckpt_path()
        if given is not None:
            merged = self.config[sub]["model"]
            check_checkpoint_config(given.as_dict(), merged.as_dict())

    def before_instantiate_classes(self) -> None:
        """Check what the config names on this machine before any class is built."""
        sub = self.config.get("subcommand")
        check_run(self.config[sub].as_dict() if sub else self.config.as_dict())

    def after_fit(self) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero:
            return
        lines = [f"run directory:  {log_dir}"]
        ckpt = trainer.checkpoint_callback
        if ckpt is not None:
            lines.append(f"checkpoints:    {ckpt.dirpath} (best: {ckpt.best_model_path or '-'})")
        for cb in trainer.callbacks:
            path = getattr(cb, "output_path", None)
            if path:
                lines.append(f"{type(cb).__name__}: {path}")
        for logger in trainer.loggers:
            lines.append(f"{type(logger).__name__} metrics: {logger.log_dir or logger.save_dir}")
        print("\n".join(lines), flush=True)


T = TypeVar("T")


def config_error(err: BaseException) -> ConfigError | None:
    """The :class:`ConfigError` behind ``err`` (jsonargparse wraps errors raised while it
    builds config classes), or ``None`` when ``err`` is not a config mistake."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def exit_on_config_error(command: Callable[[], T]) -> T:
    """Run ``command``; a config mistake prints its message (no traceback) and exits 2."""
    try:
        return command()
    except Exception as err:
        mistake = config_error(err)
        if mistake is None:
            raise
        print(f"error: {mistake}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def main(args: list[str] | None = None) -> DPGCLI:
    """Entry point (``args=None`` reads ``sys.argv``)."""
    cli = exit_on_config_error(lambda: DPGCLI(
        DPGModule,
        PromptDataModule,
        trainer_defaults={
            "inference_mode": False,
            "check_val_every_n_epoch": None,
            "val_check_interval": 10,
            "num_sanity_val_steps": 0,
            "max_steps": 20,
        },
        save_config_kwargs={"overwrite": True},
        args=args,
    ))
    close_process_group()
    return cli
