"""How a step's examples are rewarded and their advantages formed: ``model.reward``.

``dpg``: each example's exact metagradient ``dPhi/deps_i`` (:class:`MetagradientReward`),
compared within its prompt group or the batch. ``dataset``: the naive dataset-level RL baseline,
every example gets ``Phi(SFT(D))`` and the step is compared with earlier steps
(:class:`DatasetReward`). The LightningModule picks one at construction and calls its two
methods; neither knows about Lightning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import Tensor, nn

from dpg_lightning.advantages import RunningPhi, compute_advantages
from dpg_lightning.inner import InnerConfig, Phi, dataset_reward, metagradient_rewards
from dpg_lightning.inner.steps import Progress
from dpg_lightning.policy import PolicyConfig
from dpg_lightning.shared_sft import SFTPlan, WorldInfo
from dpg_lightning.tokenization import TokenRows


@dataclass
class Scored:
    """One step's inner SFT, scored: this rank's rewards, ``Phi`` after it, its step losses."""

    rewards: Tensor
    phi: Tensor
    losses: list[Tensor]


class MetagradientReward:
    """``reward: dpg``: ``r_i = dPhi/deps_i``, advantages within groups or the batch."""

    def score(
        self, target: nn.Module, data: TokenRows, phi: Phi, inner: InnerConfig, plan: SFTPlan,
        times: dict[str, float], progress: Progress | None = None,
    ) -> Scored:
        return Scored(*metagradient_rewards(
            target, data, phi, inner, plan.order, times=times, grad_reduce=plan.grad_reduce,
            progress=progress,
        ))

    def advantages(
        self, rewards: Tensor, all_rewards: Tensor, world: WorldInfo, shared: bool,
        samples_per_prompt: int, policy: PolicyConfig,
    ) -> Tensor:
        """This rank's advantages; with a shared SFT the baselines see every rank's rewards."""
        shared = shared and world.distributed
        advantages = compute_advantages(
            all_rewards if shared else rewards, samples_per_prompt, policy.baseline,
            policy.scale_rewards,
        )
        if shared:  # this rank's share of the global batch's advantages
            advantages = advantages.view(world.world_size, -1)[world.rank]
        return advantages


class DatasetReward(nn.Module):
    """``reward: dataset``: every example gets ``Phi(SFT(D))``; the advantage compares it with
    a moving average of earlier steps' Phi (a module: the average is checkpointed)."""

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.baseline = RunningPhi(decay)

    def score(
        self, target: nn.Module, data: TokenRows, phi: Phi, inner: InnerConfig, plan: SFTPlan,
        times: dict[str, float], progress: Progress | None = None,
    ) -> Scored:
        start = time.perf_counter()
        scored = Scored(*dataset_reward(
            target, data, phi, inner, plan.order, plan.grad_reduce, progress
        ))
        times["inner_sft"] = time.perf_counter() - start
        return scored

    def advantages(
        self, rewards: Tensor, all_rewards: Tensor, world: WorldInfo, shared: bool,
        samples_per_prompt: int, policy: PolicyConfig,
    ) -> Tensor:
        """The same advantage for every example of the step."""
        advantage = self.baseline.advantage(rewards[0], policy.baseline, policy.scale_rewards)
        return advantage.to(rewards.dtype).expand_as(rewards).clone()
