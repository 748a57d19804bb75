"""What attributing one inner SFT returns, the same for every backend and the dataset reward.

One type, so that a step's SFTs (the whole set, or one per inverse group) are scored by one
loop whatever computed them, and their times add up instead of the last one winning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from dpg_lightning.data.tokenization import TokenRows
from dpg_lightning.inner.config import InnerConfig
from dpg_lightning.inner.metric import MetricFn
from dpg_lightning.inner.shared_sft import RankOrder
from dpg_lightning.inner.steps import Progress


@dataclass
class Attribution:
    """One SFT, attributed.

    Attributes:
        rewards: one per example of this rank's set (detached).
        phi: ``Phi`` of the target after the SFT (detached; the same on every rank when shared).
        losses: the SFT's step losses (global ones when shared).
        seconds: wall time by part: ``inner_sft`` (the forward SFT) and, for a metagradient,
            ``attribution`` (the backward through it).
    """

    rewards: Tensor
    phi: Tensor
    losses: list[Tensor]
    seconds: dict[str, float] = field(default_factory=dict)


#: ``attribute(target, data, phi, inner, order, progress) -> Attribution``: every backend's
#: metagradient and the dataset reward (:mod:`dpg_lightning.inner.attribution`).
Attribute = Callable[[nn.Module, TokenRows, MetricFn, InnerConfig, RankOrder, Progress | None],
                     Attribution]
