"""Stopping on a signal: finish the step, checkpoint on all ranks together, then exit or requeue.

One mechanism for every "stop soon" a run receives, because a DPG step cannot be cut anywhere:

* Lightning's own SIGTERM handling ends the run after the step without a checkpoint and with
  exit status 0, and Ctrl-C abandons the step mid-way (the prompt stream and the loop counters
  then disagree with the weights) and saves nothing;
* Lightning's Slurm SIGUSR1 handler saves ``hpc_ckpt_N.ckpt`` *inside the signal handler*, i.e.
  wherever each rank happens to be; its save ends with a barrier, and with the shared SFT the
  ranks are in the middle of the inner loop's all-reduces, so one rank's barrier meets the
  other's all-reduce and the job deadlocks (seen on a real Slurm cluster).

:class:`StopOnSignal` therefore only records a signal. At the end of the training step all ranks
agree (one tiny collective per step), write a checkpoint together and stop training, skipping any
validation that was due (the signal may come with a deadline). The step's metrics are still
logged and the loggers closed as at a normal end. What follows is the subclass's:
:class:`GracefulShutdown` (SIGTERM, SIGINT) writes ``last.ckpt`` and the CLI exits with status
``128 + signal`` (the shell's "killed by a signal"); a second signal abandons the step at once.
:class:`SlurmRequeue` (Slurm's requeue signal, SIGUSR1 under auto-requeue) writes Lightning's
``hpc_ckpt_N.ckpt`` (same name and place, so Lightning's resume finds it) and runs
``scontrol requeue``. The signal must come early enough for a step plus a checkpoint
(``#SBATCH --signal=SIGUSR1@SECONDS``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from dpg_lightning.run.last_checkpoint import last_checkpoint_path


class StopOnSignal(L.Callback):
    """A signal -> the step finishes -> all ranks checkpoint -> training stops -> :meth:`after`.

    Subclasses say which signals (:meth:`signals`), where the checkpoint goes
    (:meth:`checkpoint_path`) and what happens once training has ended (:meth:`after`).
    """

    #: Install the handlers at ``setup`` (before Lightning's signal connector, which then keeps
    #: out of a signal that has a handler) or at ``on_train_start`` (after it, replacing the
    #: handler it always installs, as for SIGTERM).
    install_at_setup = False
    #: A second signal while the step finishes abandons the step (``KeyboardInterrupt``).
    second_signal_aborts = False

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal received, once one is
        self.stopped_by: int | None = None  # the signal that stopped training, once it did
        self.checkpoint: str | None = None  # the checkpoint written when training stopped
        self._signals: tuple[int, ...] = ()  # taken over for this run (same on every rank)
        self._previous: dict[int, Any] = {}

    # ---------------------------------------------------------------- what subclasses decide

    def signals(self, trainer: L.Trainer, stage: str) -> tuple[int, ...]:
        """The signals this callback takes over for ``stage`` (none: it stays inactive)."""
        raise NotImplementedError

    def checkpoint_path(self, trainer: L.Trainer) -> str:
        raise NotImplementedError

    def after(self, trainer: L.Trainer) -> None:
        """Once training has stopped and its end hooks ran (called on every rank)."""

    def on_signal(self, name: str) -> None:
        """Say that the signal arrived (from the handler: keep it short)."""

    # ---------------------------------------------------------------- the mechanism

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.install_at_setup:
            self._install(self.signals(trainer, stage))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.install_at_setup:
            self._install(self.signals(trainer, "fit"))

    def _install(self, signums: tuple[int, ...]) -> None:
        self._signals = signums  # decides the per-step collective: identical on all ranks
        if threading.current_thread() is not threading.main_thread():
            return  # handlers live in the main thread
        for signum in signums:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue  # ignored on purpose (nohup, a background job): leave it so
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None and self.second_signal_aborts:
            self._restore()
            print(f"\n[dpg] {name} again: abandoning the step; the last checkpoint saved is "
                  "kept", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            self.on_signal(name)

    @property
    def exit_code(self) -> int | None:
        """The process's exit status once a signal stopped training (``None``: the usual)."""
        return None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._signals or self.stopped_by is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            return
        # A rank that got no signal stops with its peers, as if it had received the first one.
        self.stopped_by = self.signum if self.signum is not None else self._signals[0]
        self.checkpoint = self.checkpoint_path(trainer)
        trainer.save_checkpoint(self.checkpoint)
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # should_stop would otherwise run a validation first

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        if self.stopped_by is not None:
            self.after(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()
        self._signals = ()

    def _restore(self) -> None:
        """Put back the handlers found at the start, where ours is still installed."""
        for signum, handler in self._previous.items():
            if handler is not None and signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, handler)
        self._previous = {}


class GracefulShutdown(StopOnSignal):
    """SIGTERM / SIGINT: finish this step, write ``last.ckpt``, exit ``128 + signal``."""

    second_signal_aborts = True

    def signals(self, trainer: L.Trainer, stage: str) -> tuple[int, ...]:
        return (signal.SIGTERM, signal.SIGINT)

    def checkpoint_path(self, trainer: L.Trainer) -> str:
        return last_checkpoint_path(trainer)

    def on_signal(self, name: str) -> None:
        print(f"\n[dpg] {name}: finishing this step, then writing a checkpoint and stopping "
              f"({name} again to stop at once)", file=sys.stderr, flush=True)

    @property
    def exit_code(self) -> int | None:
        """``128 + signal`` once a signal stopped training (the CLI exits with it)."""
        return None if self.stopped_by is None else 128 + self.stopped_by

    def after(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            print(
                f"[dpg] stopped by {signal.Signals(self.stopped_by).name} after step "
                f"{trainer.global_step}; checkpoint: {self.checkpoint}\n"
                "[dpg] resume with the same command plus `--ckpt_path last` (or this path)",
                file=sys.stderr, flush=True,
            )


class SlurmRequeue(StopOnSignal):
    """Lightning's Slurm auto-requeue, with the checkpoint taken between steps on all ranks."""

    install_at_setup = True

    def signals(self, trainer: L.Trainer, stage: str) -> tuple[int, ...]:
        env = getattr(trainer, "_accelerator_connector", None)
        env = getattr(env, "cluster_environment", None)
        if stage != "fit" or not isinstance(env, SLURMEnvironment) or not env.auto_requeue:
            return ()
        return (env.requeue_signal or signal.SIGUSR1,)

    def checkpoint_path(self, trainer: L.Trainer) -> str:
        return trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)

    def after(self, trainer: L.Trainer) -> None:
        """Requeue only now: this step's metrics have reached the loggers, which are flushed
        first, because ``scontrol requeue`` kills the job's tasks right away."""
        for logger in trainer.loggers:
            logger.finalize("finished")
        if trainer.is_global_zero:
            array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = (f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job
                   else os.environ["SLURM_JOB_ID"])
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            status = "requeued" if result.returncode == 0 else f"requeue failed: {result.stderr}"
            print(f"[dpg-slurm] SIGUSR1: saved {self.checkpoint}; job {job} {status}", flush=True)
