"""Multi-rank DPG: one inner SFT shared by all ranks, or one per rank (the rank math).

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

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import Tensor

from dpg_lightning.common.errors import check_choice
from dpg_lightning.inner.steps import inner_order
from dpg_lightning.inner.unrolled import GradReduce

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


@dataclass(frozen=True)
class RankOrder:
    """One inner SFT as this rank runs it: its batches of local indices (``-1`` for other
    ranks' examples, so every batch has its global length) and, for an SFT shared by several
    ranks, the differentiable SUM of their step gradients. Every backend and the dataset
    reward take one, so a single-rank SFT is simply ``RankOrder(inner_order(...))``."""

    batches: list[Tensor]
    grad_reduce: GradReduce | None = None

    @property
    def num_examples(self) -> int:
        """Examples in the SFT, all ranks' (the batches' global lengths add up to it)."""
        return sum(len(batch) for batch in self.batches)


def rank_order(
    n_local: int, batch_size: int, shuffle: bool, seed: int, mode: Mode, world: WorldInfo
) -> RankOrder:
    """This rank's order (and gradient reduce) of one SFT over its ``n_local`` examples.

    ``shared`` on several ranks: one global order over ``world_size * n_local`` examples, the
    same on every rank (same seed), sharded by :func:`shard_order`; every rank must hold the
    same number of examples (``num_prompts x samples_per_prompt``, equal by construction).
    ``independent`` or a single rank: an ordinary local order, no communication.
    """
    check_choice("distributed", mode, get_args(Mode))
    if mode == "independent" or not world.distributed:
        return RankOrder(inner_order(n_local, batch_size, shuffle, seed))
    n_global = n_local * world.world_size
    order = inner_order(n_global, batch_size, shuffle, seed)
    return RankOrder(shard_order(order, world.rank, n_local), sum_across_ranks())
