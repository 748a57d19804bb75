"""Multi-rank DPG: one inner SFT shared by all ranks, or one per rank; Slurm launch checks.

Why a shared SFT: the paper's inner SFT is one SFT over the whole synthetic set of a step, and a
DPG reward is the metagradient of ``Phi`` for *that* SFT. With DDP each rank only samples its
share of the prompts, so ``distributed: shared`` (the default) makes the ranks run that one SFT
together (a data-parallel SFT inside the differentiable loop):

* all ranks draw the same *global* shuffled order over the union of their examples (rank ``r``
  holds global indices ``[r * n, (r + 1) * n)``) and each takes its examples of every global
  batch (:func:`shard_order`; other ranks' examples are ``-1``, so batch sizes stay global);
* each rank's step loss is divided by the global batch size, and the per-rank step gradients
  are summed with a *differentiable* all-reduce (:func:`sum_across_ranks`), so every rank
  applies the same global gradient and ends with the same trained target and the same ``Phi``;
* differentiating ``Phi`` then runs the all-reduces backwards (the backward of a SUM is a SUM
  of the ranks' upstream gradients), which gives each rank the exact reward of each of its
  examples for the full set, times ``world_size`` (every rank differentiates its own copy of
  ``Phi``); :func:`dpg_lightning.inner.metagradient_rewards` divides that out.

The cost is one all-reduce of the trained parameters' gradients per inner step, forward and
backward. ``distributed: independent`` skips it: each rank fine-tunes its own copy of the
target on its own examples only. That is an *approximation* (a rank's rewards measure its
examples' effect on an SFT over ``1 / world_size`` of the data, with ``world_size`` times fewer
inner steps), offered for when the shared SFT's communication is too costly.

The target is never registered with DDP's reducer (its parameters have ``requires_grad=False``;
DDP with ``autograd.grad(create_graph=True)`` is known to misbehave, pytorch/pytorch#47562 and
#63812); only the generator's gradients are averaged by DDP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from torch import Tensor

from dpg_lightning.inner import GradReduce, inner_order

Mode = Literal["shared", "independent"]


@dataclass(frozen=True)
class WorldInfo:
    """This process's rank and the number of ranks (``0`` and ``1`` without a process group)."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_info() -> WorldInfo:
    """Rank and world size of the default process group (single process when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return WorldInfo(dist.get_rank(), dist.get_world_size())
    return WorldInfo()


def close_process_group() -> None:
    """Barrier, then destroy the default process group, once a multi-rank run is over.

    Lightning leaves the group up; a rank that then exits while its peers still hold the
    connections can die at interpreter shutdown ("terminate called without an active
    exception", seen under srun), and ``srun --kill-on-bad-exit`` fails the whole job.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_cat(tensor: Tensor, world: WorldInfo | None = None) -> Tensor:
    """Concatenate every rank's ``tensor`` (same shape on all ranks) along dim 0, in rank order.

    Not differentiable: used for rewards and logging, where a rank needs the others' values
    (e.g. batch-level reward baselines over the global batch), not their gradients.
    """
    world = world or world_info()
    if not world.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (SUM) whose backward is again a SUM all-reduce (itself differentiable).

    Same as ``torch.distributed.nn.functional.all_reduce``, which torch now flags as deprecated
    (its suggested replacement, the functional collectives' ``all_reduce``, has no autograd).
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _SumAcrossRanks.apply(grad, ctx.group), None


def sum_across_ranks(group: dist.ProcessGroup | None = None) -> GradReduce:
    """A ``grad_reduce`` for the shared SFT: the differentiable SUM of a list of gradients.

    Gradients are flattened into one buffer (in their common dtype) and reduced with a single
    collective. Besides saving latency, this fixes the order of collectives: every inner step
    has exactly one all-reduce, and its backward can only run after the next step's, so all
    ranks meet in the same order in the backward pass too (per-tensor collectives would be
    ordered by autograd's ready queue, which need not agree across ranks). ``None`` entries
    (parameters a loss does not reach: the same on every rank) stay ``None``.
    """

    def reduce(grads: list[Tensor | None]) -> list[Tensor | None]:
        present = [(i, g) for i, g in enumerate(grads) if g is not None]
        if not present:
            return list(grads)
        dtype = present[0][1].dtype
        for _, g in present[1:]:
            dtype = torch.promote_types(dtype, g.dtype)
        flat = torch.cat([g.reshape(-1).to(dtype) for _, g in present])
        total = _SumAcrossRanks.apply(flat, group)
        out: list[Tensor | None] = list(grads)
        parts = total.split([g.numel() for _, g in present])
        for (i, g), part in zip(present, parts, strict=True):
            out[i] = part.view_as(g).to(g.dtype)
        return out

    return reduce


def shard_order(global_order: list[Tensor], rank: int, n_local: int) -> list[Tensor]:
    """This rank's view of a global inner order: local indices, ``-1`` for other ranks' examples.

    Rank ``r`` holds global examples ``[r * n_local, (r + 1) * n_local)``; keeping the ``-1``
    placeholders keeps each batch's length equal to the global batch size, which is the
    divisor of each rank's share of the step loss.
    """
    lo = rank * n_local
    out = []
    for batch in global_order:
        local = batch - lo
        out.append(torch.where((local >= 0) & (local < n_local), local, torch.full_like(local, -1)))
    return out


@dataclass
class SFTPlan:
    """What one step's inner SFT needs on this rank: its order, the reduce, the set size."""

    order: list[Tensor]
    grad_reduce: GradReduce | None
    num_examples: int


def plan_sft(
    n_local: int, batch_size: int, shuffle: bool, seed: int, mode: Mode, world: WorldInfo
) -> SFTPlan:
    """The inner order (and gradient reduce) of one step on this rank.

    ``shared`` on several ranks: one global order over ``world_size * n_local`` examples, the
    same on every rank (same seed), sharded by :func:`shard_order`; every rank must hold the
    same number of examples (``num_prompts x samples_per_prompt``, equal by construction).
    ``independent`` or a single rank: an ordinary local order, no communication.
    """
    if mode not in ("shared", "independent"):
        raise ValueError(f"`model.distributed` is {mode!r}; use `shared` or `independent`")
    if mode == "independent" or not world.distributed:
        return SFTPlan(inner_order(n_local, batch_size, shuffle, seed), None, n_local)
    n_global = n_local * world.world_size
    order = inner_order(n_global, batch_size, shuffle, seed)
    return SFTPlan(shard_order(order, world.rank, n_local), sum_across_ranks(), n_global)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the RNG for training step ``step`` on ``rank``.

    Re-seeding at every step makes sampling a pure function of (seed, step, rank, weights), so a
    resumed run draws exactly what the uninterrupted run drew (no RNG state to checkpoint, and
    no per-rank state that rank 0's checkpoint could not hold), and ranks never share samples.
    """
    return (seed * 1_000_003 + step * 10_007 + rank * 7_919 + 17) % (2**63 - 1)


# --------------------------------------------------------------------------- Slurm


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
        raise RuntimeError(
            f"this Slurm job has {ntasks} tasks but the script was not started by `srun`, so "
            "the other ranks never start and training would hang at 'Initializing distributed'. "
            "Launch it as `srun python -m dpg_lightning fit ...` (see slurm/README.md)"
        )
    nnodes, per_node = _int_env("SLURM_NNODES"), _int_env("SLURM_NTASKS_PER_NODE")
    if num_nodes is not None and nnodes is not None and num_nodes != nnodes:
        raise ValueError(
            f"`trainer.num_nodes` is {num_nodes} but the Slurm allocation has {nnodes} node(s) "
            "(`#SBATCH --nodes`); pass `--trainer.num_nodes=$SLURM_NNODES`"
        )
    if devices is not None and per_node is not None and devices != per_node:
        raise ValueError(
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


# --------------------------------------------------------------------------- resume

# Model hyper-parameters that make a checkpoint another run: resuming across them is an error.
IDENTITY_KEYS = ("generator", "target", "reward", "distributed")


def check_checkpoint_config(current: dict[str, Any], saved: dict[str, Any]) -> None:
    """Error on a checkpoint of a different model; warn about other changed hyper-parameters.

    Why an error: a checkpoint of another architecture otherwise fails deep in
    ``load_state_dict`` with a wall of shape mismatches, and one of the same shapes but another
    reward/target/sharing would silently become a different experiment. ``LightningCLI``
    rebuilds the model from the checkpoint's hyper-parameters, replacing the config's, so the
    CLI calls this before that happens (``DPGCLI``); ``on_load_checkpoint`` covers the rest.
    """
    differ = sorted(k for k in set(current) | set(saved)
                    if k in current and k in saved and current[k] != saved[k])
    fatal = [k for k in differ if k in IDENTITY_KEYS]
    if fatal:
        lines = "\n".join(_diff_lines(f"model.{k}", saved[k], current[k]) for k in fatal)
        raise ValueError(
            "the checkpoint was trained with a different model configuration, so it cannot be "
            f"resumed with this config:\n{lines}\nresume with the config the checkpoint was "
            "trained with (config.yaml in its run directory) or start a fresh run"
        )
    if differ:
        warnings.warn(
            f"resuming with changed model settings {differ}: the checkpoint's values are used "
            "(LightningCLI restores a model from its checkpoint's hyper-parameters)",
            stacklevel=2,
        )


def _diff_lines(key: str, saved: Any, current: Any) -> str:
    """``key: checkpoint X, config Y`` for each differing leaf (nested dicts are walked)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        return "\n".join(_diff_lines(f"{key}.{k}", saved.get(k), current.get(k)) for k in keys)
    return f"  {key}: checkpoint {saved!r}, config {current!r}"
