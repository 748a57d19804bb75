"""Attribution: each example's reward for one inner SFT, by backend.

``dpg``: the exact metagradient ``r_i = dPhi/deps_i`` at ``eps = 1``, either by one backward
through the unrolled SFT (``higher``/``func``) or step by step (``replay``, memory flat in the
inner steps). ``first_order`` is a cheaper approximation that drops the SFT's second-order
terms (:mod:`dpg_lightning.inner.first_order`). ``dataset``: the naive baseline, every
example gets ``Phi(SFT(D))``.

All share one signature, ``(target, data, phi, inner, order, progress) -> Attribution``
(:data:`~dpg_lightning.inner.attribution_result.Attribute`), so callers never adapt them.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from dpg_lightning.data.tokenization import TokenRows
from dpg_lightning.inner.attribution_result import Attribution
from dpg_lightning.inner.config import InnerConfig
from dpg_lightning.inner.first_order import first_order_rewards
from dpg_lightning.inner.metric import MetricFn
from dpg_lightning.inner.replay import replay_rewards
from dpg_lightning.inner.sft import run_sft
from dpg_lightning.inner.shared_sft import RankOrder
from dpg_lightning.inner.steps import Progress, eps_dtype


def metagradient_rewards(
    target: nn.Module,
    data: TokenRows,
    phi: MetricFn,
    cfg: InnerConfig,
    order: RankOrder,
    progress: Progress | None = None,
) -> Attribution:
    """DPG rewards ``r_i = dPhi/deps_i`` at ``eps = 1``.

    Its seconds are the forward SFT's (``inner_sft``) and the backward pass's through it
    (``attribution``). With ``order.grad_reduce`` (shared SFT) the rewards are those of this
    rank's examples for the SFT over all ranks' examples.
    """
    if cfg.backend == "replay":
        return replay_rewards(target, data, phi, cfg, order, progress)
    if cfg.backend == "first_order":
        return first_order_rewards(target, data, phi, cfg, order, progress)
    grad_reduce = order.grad_reduce
    start = time.perf_counter()
    eps = torch.ones(
        len(data), dtype=eps_dtype(target), device=data.input_ids.device, requires_grad=True
    )
    value, losses = run_sft(
        target, data, eps, phi, cfg, order.batches, True, grad_reduce, progress
    )
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
    seconds = {"inner_sft": middle - start, "attribution": time.perf_counter() - middle}
    if rewards is None:
        rewards = torch.zeros_like(eps)
    return Attribution(rewards.detach(), value.detach(), losses, seconds)


def dataset_reward(
    target: nn.Module,
    data: TokenRows,
    phi: MetricFn,
    cfg: InnerConfig,
    order: RankOrder,
    progress: Progress | None = None,
) -> Attribution:
    """Naive baseline: every example gets ``Phi(SFT(D))`` (same SFT, no metagradient); its
    seconds are the SFT's (``inner_sft``)."""
    start = time.perf_counter()
    eps = torch.ones(len(data), device=data.input_ids.device)
    value, losses = run_sft(
        target, data, eps, phi, cfg, order.batches, False, order.grad_reduce, progress
    )
    value = value.detach()
    seconds = {"inner_sft": time.perf_counter() - start}
    return Attribution(value.expand(len(data)).clone(), value, losses, seconds)
