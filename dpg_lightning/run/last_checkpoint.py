"""``last.ckpt`` every few steps and at the end of training: what ``--ckpt_path last`` resumes.

Lightning's ``ModelCheckpoint(monitor=...)`` rewrites ``last.ckpt`` only when it saves a top-k
file, i.e. when the monitored metric improves: a run whose ``val/phi`` peaked early keeps an old
``last.ckpt`` and a hard kill (``kill -9``, a node failure) throws away every step since. With
``every_n_train_steps`` under manual optimization it also warns on every save that the weights
are those *after* the optimizer step (which is what a resume needs), and its ``on_train_end``
skips the final step once any ``last.ckpt`` exists. This subclass keeps Lightning's file
handling (names, ``dirpath``, the checkpoint IO, state) and only decides *when*: every
``every_n_train_steps`` steps and after the last one. :func:`last_checkpoint_path` says *where*,
for a stop on a signal that writes it out of turn.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


def last_checkpoint_path(trainer: L.Trainer) -> str:
    """Where the run's ``last.ckpt`` goes: the ModelCheckpoint's directory when there is one
    (where ``--ckpt_path last`` looks), else ``<run dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        name = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
        return os.path.join(callback.dirpath, name)
    root = trainer.log_dir or trainer.default_root_dir
    return os.path.join(root, "checkpoints", "last.ckpt")


class LastCheckpoint(ModelCheckpoint):
    """Writes ``<dirpath>/last.ckpt`` every ``every_n_train_steps`` steps and at the end."""

    def __init__(self, every_n_train_steps: int = 10, dirpath: str | None = None) -> None:
        if not isinstance(every_n_train_steps, int) or every_n_train_steps < 1:
            raise ValueError(f"LastCheckpoint: every_n_train_steps={every_n_train_steps!r} must "
                             "be a positive integer (1 = a checkpoint after every step)")
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True,
                         every_n_train_steps=every_n_train_steps)

    def _save_last(self, trainer: L.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step % self._every_n_train_steps == 0:
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # the steps decide; an epoch of DPG is one pass over the prompt stream

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last(trainer)
