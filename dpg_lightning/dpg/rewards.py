"""How a step's rewards become advantages: ``model.reward``.

``dpg``: each example's exact metagradient ``dPhi/deps_i`` (:class:`MetagradientReward`),
compared within its prompt group or the batch. ``dataset``: the naive dataset-level RL baseline
(:class:`DatasetReward`): every example gets ``Phi`` of the SFT it was in. With inverse groups
(``model.sft_groups: inverse``, :mod:`dpg_lightning.dpg.step`) the groups' Phi are compared
within the step (the batch, the paper's naive baseline); without groups, the step's one Phi is
compared with a moving average of earlier steps' Phi.

The rewards themselves come from :func:`dpg_lightning.dpg.step.score_step`; neither class
knows about Lightning.
"""

from __future__ import annotations

from torch import Tensor, nn

from dpg_lightning.dpg.advantages import RunningPhi, compute_advantages, grpo_official_advantages
from dpg_lightning.dpg.policy import PolicyConfig
from dpg_lightning.inner.shared_sft import WorldInfo


def batch_advantages(
    rewards: Tensor, all_rewards: Tensor, world: WorldInfo, shared: bool,
    samples_per_prompt: int, policy: PolicyConfig,
) -> Tensor:
    """This rank's advantages from per-example rewards; with a shared SFT the baselines see
    every rank's rewards."""
    shared = shared and world.distributed
    scored = all_rewards if shared else rewards
    if policy.advantage_normalization == "grpo_official":
        advantages = grpo_official_advantages(scored, samples_per_prompt, policy.reward_scale)
    else:
        advantages = compute_advantages(
            scored, samples_per_prompt, policy.baseline, policy.scale_rewards
        )
    if shared:  # this rank's share of the global batch's advantages
        advantages = advantages.view(world.world_size, -1)[world.rank]
    return advantages


class MetagradientReward:
    """``reward: dpg``: ``r_i = dPhi/deps_i``, advantages within groups or the batch."""

    def __init__(self, grouped: bool = False) -> None:
        self.grouped = grouped

    def advantages(
        self, rewards: Tensor, all_rewards: Tensor, world: WorldInfo, shared: bool,
        samples_per_prompt: int, policy: PolicyConfig,
    ) -> Tensor:
        return batch_advantages(rewards, all_rewards, world, shared, samples_per_prompt, policy)


class DatasetReward(nn.Module):
    """``reward: dataset``: every example gets ``Phi`` of its SFT. With inverse groups the
    groups' Phi are compared within the step (``policy.baseline`` / ``scale_rewards``, the
    paper's: the batch); else the step's one Phi is compared with a moving average of earlier
    steps' Phi (a module: the average is checkpointed)."""

    def __init__(self, decay: float, grouped: bool = False) -> None:
        super().__init__()
        self.grouped = grouped
        self.baseline = RunningPhi(decay)

    def advantages(
        self, rewards: Tensor, all_rewards: Tensor, world: WorldInfo, shared: bool,
        samples_per_prompt: int, policy: PolicyConfig,
    ) -> Tensor:
        if self.grouped:
            return batch_advantages(rewards, all_rewards, world, shared, samples_per_prompt,
                                    policy)
        advantage = self.baseline.advantage(rewards[0], policy.baseline, policy.scale_rewards)
        return advantage.to(rewards.dtype).expand_as(rewards).clone()


def make_rewarder(
    reward: str, policy: PolicyConfig, grouped: bool
) -> MetagradientReward | DatasetReward:
    """The advantages of ``model.reward``, with inverse groups or not: per-example rewards
    (``dpg``, ``example``) are compared within groups or the batch; ``dataset`` rewards share
    one Phi per SFT."""
    if reward in ("dpg", "example"):
        return MetagradientReward(grouped)
    return DatasetReward(policy.dataset_baseline_decay, grouped)
