"""Slurm: launch checks that fail fast with the fix, and a requeue that checkpoints between steps.

Lightning takes ranks and world size from Slurm's variables and installs its own SIGUSR1
requeue; both need help for DPG (a multi-task script started without ``srun`` hangs; a
checkpoint taken inside the signal handler deadlocks the shared SFT). ``slurm/README.md``
shows the sbatch templates that use them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from dpg_lightning.common.errors import ConfigError


def _int_env(name: str) -> int | None:
    """An integer Slurm variable; ``SLURM_NTASKS_PER_NODE`` may read ``2(x3)`` (per-node list)."""
    value = os.environ.get(name)
    if not value:
        return None
    head = value.split(",")[0].split("(")[0]
    return int(head) if head.isdigit() else None


def in_slurm_batch_job() -> bool:
    """Inside an ``sbatch`` job (not an interactive ``salloc``/``srun --pty bash`` shell)."""
    return "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in (
        "bash",
        "interactive",
    )


def check_slurm_launch(num_nodes: int | None = None, devices: int | None = None) -> None:
    """Fail fast, with the fix, when a Slurm job would hang or mis-assign ranks.

    Lightning takes world size and ranks from ``SLURM_NTASKS`` / ``SLURM_PROCID``. Started
    without ``srun`` from a multi-task batch script, the only process waits forever for the
    others at "Initializing distributed"; with ``num_nodes`` / ``devices`` different from the
    allocation, ranks and world size disagree. Outside Slurm this does nothing.
    """
    if not in_slurm_batch_job():
        return
    ntasks = _int_env("SLURM_NTASKS") or 1
    if ntasks > 1 and "SLURM_STEP_ID" not in os.environ and "SLURM_STEPID" not in os.environ:
        raise ConfigError(
            f"this Slurm job has {ntasks} tasks but the script was not started by `srun`, so "
            "the other ranks never start and training would hang at 'Initializing distributed'. "
            "Launch it as `srun python -m dpg_lightning fit ...` (see slurm/README.md)"
        )
    nnodes, per_node = _int_env("SLURM_NNODES"), _int_env("SLURM_NTASKS_PER_NODE")
    if num_nodes is not None and nnodes is not None and num_nodes != nnodes:
        raise ConfigError(
            f"`trainer.num_nodes` is {num_nodes} but the Slurm allocation has {nnodes} node(s) "
            "(`#SBATCH --nodes`); pass `--trainer.num_nodes=$SLURM_NNODES`"
        )
    if devices is not None and per_node is not None and devices != per_node:
        raise ConfigError(
            f"`trainer.devices` is {devices} but the Slurm allocation runs {per_node} task(s) "
            "per node (`#SBATCH --ntasks-per-node`, one task per GPU); pass "
            "`--trainer.devices=$SLURM_NTASKS_PER_NODE`"
        )


class SlurmRequeue(L.Callback):
    """Lightning's Slurm auto-requeue, with the checkpoint taken between steps on all ranks.

    Lightning's own SIGUSR1 handler saves ``hpc_ckpt_N.ckpt`` *inside the signal handler*, i.e.
    wherever each rank happens to be. Its save ends with a barrier; with the shared SFT the
    ranks are in the middle of the inner loop's all-reduces, so one rank's barrier meets the
    other's all-reduce and the job deadlocks (seen on a real Slurm cluster). This callback
    installs its SIGUSR1 handler first (Lightning then keeps out: it only registers one where
    there is none); the handler just records the request. At the end of the next training
    batch the ranks agree (one tiny collective per step), save the HPC checkpoint together
    (same file name and place as Lightning's, so Lightning's resume logic finds it) and stop
    training; once the loggers are flushed, rank 0 runs ``scontrol requeue``. The signal must
    come early enough for a step plus a checkpoint (``#SBATCH --signal=SIGUSR1@SECONDS``).
    """

    def __init__(self) -> None:
        self.requested = False
        self.saved: str | None = None  # the HPC checkpoint written for a pending requeue
        self._previous: Any = None
        self._signal: signal.Signals | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        env = getattr(trainer, "_accelerator_connector", None)
        env = getattr(env, "cluster_environment", None)
        if stage != "fit" or not isinstance(env, SLURMEnvironment) or not env.auto_requeue:
            return
        if threading.current_thread() is not threading.main_thread():
            return
        self._signal = env.requeue_signal or signal.SIGUSR1
        self._previous = signal.signal(self._signal, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._signal is None or self.saved is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.saved = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(self.saved)
        trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Requeue only now: this step's metrics have reached the loggers, which are flushed
        first, because ``scontrol requeue`` kills the job's tasks right away."""
        if self.saved is None:
            return
        for logger in trainer.loggers:
            logger.finalize("finished")
        if trainer.is_global_zero:
            array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = (f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job
                   else os.environ["SLURM_JOB_ID"])
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            status = "requeued" if result.returncode == 0 else f"requeue failed: {result.stderr}"
            print(f"[dpg-slurm] SIGUSR1: saved {self.saved}; job {job} {status}", flush=True)
        self.saved, self.requested = None, False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._signal is not None and self._previous is not None:
            signal.signal(self._signal, self._previous)
        self._signal = None


