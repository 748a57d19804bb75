"""The analysis' only calls into the inner SFT and the exact metagradient.

Kept in one file so that a change of those signatures is fixed here once, not in every
analysis.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor, nn

from dpg_lightning.data.tokenization import TokenRows
from dpg_lightning.inner.attribution import metagradient_rewards
from dpg_lightning.inner.config import InnerConfig
from dpg_lightning.inner.metric import MetricFn
from dpg_lightning.inner.sft import run_sft
from dpg_lightning.inner.shared_sft import RankOrder


def plain_phi(
    target: nn.Module,
    data: TokenRows,
    eps: Tensor,
    metric: MetricFn,
    cfg: InnerConfig,
    order: list[Tensor],
) -> Tensor:
    """``Phi`` after the plain (graph-free) inner SFT with example weights ``eps``."""
    value, _ = run_sft(target, data, eps, metric, cfg, order, create_graph=False)
    return value.detach()


def exact_rewards(
    target: nn.Module,
    data: TokenRows,
    metric: MetricFn,
    cfg: InnerConfig,
    order: list[Tensor],
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The exact DPG rewards ``dPhi/deps_i`` at ``eps = 1``: ``(rewards, Phi, losses)``."""
    out = metagradient_rewards(target, data, metric, cfg, RankOrder(order))
    return out.rewards, out.phi, out.losses


def first_order(
    target: nn.Module,
    data: TokenRows,
    metric: MetricFn,
    cfg: InnerConfig,
    order: list[Tensor],
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The first-order rewards: the same attribution with ``backend: first_order``."""
    return exact_rewards(target, data, metric, replace(cfg, backend="first_order"), order)
