"""``python -m dpg_lightning fit --config configs/....yaml``: a thin LightningCLI.

Defaults that every DPG run needs are set here, so configs stay short: validation runs a plain
SFT and needs autograd (``inference_mode: false``), and the prompt stream is endless, so
validation is scheduled every ``val_check_interval`` steps rather than per epoch.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from dpg_lightning.checkpoints import check_checkpoint_config
from dpg_lightning.data import PromptDataModule
from dpg_lightning.module import DPGModule
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


def main(args: list[str] | None = None) -> DPGCLI:
    """Entry point (``args=None`` reads ``sys.argv``)."""
    cli = DPGCLI(
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
    )
    close_process_group()
    return cli
