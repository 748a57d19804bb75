"""Attribution: each example's reward for one inner SFT, by backend.

``dpg``: the exact metagradient ``r_i = dPhi/deps_i`` at ``eps = 1``, either by one backward
through the unrolled SFT (``higher``/``func``) or step by step (``replay``, memory flat in the
inner steps). ``dataset``: the naive baseline, every example gets ``Phi(SFT(D))``.

Both return ``(rewards, Phi, step losses)``.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from dpg_lightning.data.tokenization import TokenRows
from dpg_lightning.inner.config import InnerConfig
from dpg_lightning.inner.metric import MetricFn
from dpg_lightning.inner.replay import replay_rewards
from dpg_lightning.inner.sft import run_sft
from dpg_lightning.inner.steps import Progress, eps_dtype
from dpg_lightning.inner.unrolled import GradReduce


def metagradient_rewards(
    target: nn.Module,
    data: TokenRows,
    phi: MetricFn,
    cfg: InnerConfig,
    order: list[Tensor],
    times: dict[str, float] | None = None,
    grad_reduce: GradReduce | None = None,
    progress: Progress | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """DPG rewards ``r_i = dPhi/deps_i`` at ``eps = 1``; returns ``(rewards, Phi, losses)``.

    ``times`` (if given) receives seconds spent in the forward SFT (``inner_sft``) and in the
    backward pass through it (``attribution``). With ``grad_reduce`` (shared SFT) the rewards
    are those of this rank's examples for the SFT over all ranks' examples.
    """
    if cfg.backend == "replay":
        return replay_rewards(target, data, phi, cfg, order, times, progress, grad_reduce)
    start = time.perf_counter()
    eps = torch.ones(
        len(data), dtype=eps_dtype(target), device=data.input_ids.device, requires_grad=True
    )
    value, losses = run_sft(target, data, eps, phi, cfg, order, True, grad_reduce, progress)
    middle = time.perf_counter()
    if progress is not None:
        progress("attribution", 0, 0)
    (rewards,) = torch.autograd.grad(value, eps, allow_unused=True)
    if grad_reduce is not None and rewards is not None:
        # Every rank computed the same Phi and differentiates it; the backward of each SUM
        # all-reduce adds the ranks' upstream gradients, so what came back is the gradient of
        # world_size * Phi. The reduce of a one counts the ranks (any process group works).
        one = torch.ones((), dtype=rewards.dtype, device=rewards.device)
        rewards = rewards / grad_reduce([one])[0]
    if times is not None:
        times["inner_sft"] = middle - start
        times["attribution"] = time.perf_counter() - middle
    if rewards is None:
        rewards = torch.zeros_like(eps)
    return rewards.detach(), value.detach(), losses


def dataset_reward(
    target: nn.Module,
    data: TokenRows,
    phi: MetricFn,
    cfg: InnerConfig,
    order: list[Tensor],
    grad_reduce: GradReduce | None = None,
    progress: Progress | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Naive baseline: every example gets ``Phi(SFT(D))`` (same SFT, no metagradient)."""
    eps = torch.ones(len(data), device=data.input_ids.device)
    value, losses = run_sft(target, data, eps, phi, cfg, order, False, grad_reduce, progress)
    value = value.detach()
    return value.expand(len(data)).clone(), value, losses
