"""One W&B run per DPG run: its id is kept in the run directory, where a resume finds it.

A resumed (or requeued) run would otherwise start a new W&B run and split its curves. The id is
written when training starts (:class:`RememberWandbRun`) and handed to the resumed logger by
:func:`dpg_lightning.run.run_dir.resolve_run` through :func:`stored_wandb_id`.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger

WANDB_ID_FILE = "wandb_run_id"


def stored_wandb_id(run_dir: Path) -> str | None:
    """The W&B run id kept in ``run_dir``, unless the user named one (``WANDB_RUN_ID``)."""
    stored = run_dir / WANDB_ID_FILE
    if os.environ.get("WANDB_RUN_ID") or not stored.is_file():
        return None
    return stored.read_text().strip()


class RememberWandbRun(L.Callback):
    """Write each W&B logger's run id to ``<run dir>/wandb_run_id``, where a resume finds it."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        wandb = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if stage != "fit" or not wandb:
            return
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: all ranks
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / WANDB_ID_FILE).write_text(wandb[0].experiment.id + "\n")
