"""SIGTERM and Ctrl-C: finish the step, write a checkpoint, say how to resume, exit 128+signal.

Lightning's own SIGTERM handling ends the run after the step without a checkpoint and with
exit status 0, and Ctrl-C abandons the step mid-way (the prompt stream and the loop counters
then disagree with the weights) and saves nothing. A DPG step at paper scale takes minutes, so
this callback takes both signals over: the first one is recorded and the step in progress
finishes; at its end all ranks agree (one tiny collective per step), write the run's
``last.ckpt`` together and stop training (skipping any validation that was due: the signal may
come with a deadline). The step's metrics are still logged and the loggers closed as at a
normal end; the CLI then exits with status ``128 + signal`` (the shell's convention for
"killed by a signal"). A second signal abandons the step at once: the last checkpoint saved
is kept. Slurm's SIGUSR1 requeue is :class:`~dpg_lightning.run.slurm.SlurmRequeue`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import lightning as L

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def last_checkpoint_path(trainer: L.Trainer) -> str:
    """Where the run's ``last.ckpt`` goes: the ModelCheckpoint's directory when there is one
    (where ``--ckpt_path last`` looks), else ``<run dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        name = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
        return os.path.join(callback.dirpath, name)
    root = trainer.log_dir or trainer.default_root_dir
    return os.path.join(root, "checkpoints", "last.ckpt")


class GracefulShutdown(L.Callback):
    """Turns SIGTERM / SIGINT into "finish this step, checkpoint, exit 128+signal"."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal received, once one is
        self.stopped_by: int | None = None  # the signal that stopped training, once it did
        self.checkpoint: str | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning installs its own SIGTERM handler when the run starts (after the callbacks'
        # setup); this replaces it for the training loop. Handlers live in the main thread.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue  # ignored on purpose (nohup, a background job): leave it so
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:  # the second signal: give up on the step
            self._restore()
            print(f"\n[dpg] {name} again: abandoning the step; the last checkpoint saved is "
                  "kept", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n[dpg] {name}: finishing this step, then writing a checkpoint and stopping "
              f"({name} again to stop at once)", file=sys.stderr, flush=True)

    @property
    def exit_code(self) -> int | None:
        """``128 + signal`` once a signal stopped training, else ``None``."""
        return None if self.stopped_by is None else 128 + self.stopped_by

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.stopped_by is not None:
            return
        asked = trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False)
        if not asked:
            return
        # A rank that got no signal stops with its peers, under the signal of rank 0's.
        self.stopped_by = self.signum if self.signum is not None else signal.SIGTERM
        self.checkpoint = last_checkpoint_path(trainer)
        trainer.save_checkpoint(self.checkpoint)
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # should_stop would otherwise run a validation first
        if trainer.is_global_zero:
            print(
                f"[dpg] stopped by {signal.Signals(self.stopped_by).name} after step "
                f"{trainer.global_step}; checkpoint: {self.checkpoint}\n"
                "[dpg] resume with the same command plus `--ckpt_path last` (or this path)",
                file=sys.stderr, flush=True,
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        """Put back the handlers found at the start, where ours is still installed."""
        for signum, handler in self._previous.items():
            if handler is not None and signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, handler)
        self._previous = {}
