"""Slurm launch checks that fail fast with the fix.

Lightning takes ranks and world size from Slurm's variables; a multi-task script started without
``srun`` then hangs, and a trainer sized differently from the allocation mis-assigns ranks. The
requeue on Slurm's signal is :class:`~dpg_lightning.run.stopping.SlurmRequeue`;
``slurm/README.md`` shows the sbatch templates.
"""

from __future__ import annotations

import os

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
