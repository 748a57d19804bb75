"""How a step's examples are rewarded and their advantages formed: ``model.reward``.

``dpg``: each example's exact metagradient ``dPhi/deps_i`` (:class:`MetagradientReward`),
compared within its prompt group or the batch. ``dataset``: the naive dataset-level RL baseline
(:class:`DatasetReward`): every example gets ``Phi`` of the SFT it was in.

Which SFT an example is in: one over the step's whole set (``model.sft_groups: all``), or, with
``inverse``, one per *inverse group*: group k holds the k-th sample of every prompt, so each
prompt has one sample in every group. The paper's naive baseline is the dataset reward with
inverse groups, its groups' Phi compared within the step (the batch); its "no cross-group
batching" ablation is the metagradient with inverse groups. Without groups, the dataset reward
compares the step's one Phi with a moving average of earlier steps' Phi.

The LightningModule picks one at construction and calls its two methods; neither knows about
Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpg_lightning.data.tokenization import TokenRows
from dpg_lightning.dpg.advantages import RunningPhi, compute_advantages, grpo_official_advantages
from dpg_lightning.dpg.policy import PolicyConfig
from dpg_lightning.inner import InnerConfig, MetricFn, dataset_reward, metagradient_rewards
from dpg_lightning.inner.shared_sft import SFTPlan, WorldInfo
from dpg_lightning.inner.steps import Progress

#: ``plan(n_local, group)``: this rank's inner order (and reduce) for an SFT over ``n_local``
#: local examples; ``group`` is ``None`` for the whole set, else the inverse group's number.
PlanFor = Callable[[int, int | None], SFTPlan]
#: The attribution of one SFT: ``(target, data, phi, inner, order, grad_reduce, times,
#: progress) -> (rewards, Phi, losses)``.
Attribute = Callable[..., tuple[Tensor, Tensor, list[Tensor]]]


@dataclass
class Scored:
    """One step's inner SFT(s), scored: this rank's rewards, ``Phi`` after it (the groups'
    mean with inverse groups), its step losses, and the number of examples per SFT."""

    rewards: Tensor
    phi: Tensor
    losses: list[Tensor]
    num_examples: int


def inverse_groups(n: int, samples_per_prompt: int) -> list[Tensor]:
    """Local indices of group k = the k-th sample of every prompt (rows are prompt-major)."""
    return [torch.arange(k, n, samples_per_prompt) for k in range(samples_per_prompt)]


def _subset(data: TokenRows, rows: Tensor) -> TokenRows:
    rows = rows.to(data.input_ids.device)
    return TokenRows(data.input_ids[rows], data.attention_mask[rows], data.labels[rows])


def score_sfts(
    attribute: Attribute,
    target: nn.Module,
    data: TokenRows,
    phi: MetricFn,
    inner: InnerConfig,
    plan_for: PlanFor,
    groups: list[Tensor] | None,
    times: dict[str, float],
    progress: Progress | None,
) -> Scored:
    """Run ``attribute`` on the whole set, or once per group, and put the rewards in place."""
    if groups is None:
        plan = plan_for(len(data), None)
        rewards, value, losses = attribute(target, data, phi, inner, plan.order,
                                           plan.grad_reduce, times, progress)
        return Scored(rewards, value, losses, plan.num_examples)
    rewards = None
    values, losses, examples = [], [], 0
    for k, rows in enumerate(groups):
        plan = plan_for(len(rows), k)
        part, value, part_losses = attribute(target, _subset(data, rows), phi, inner,
                                             plan.order, plan.grad_reduce, times, progress)
        if rewards is None:
            rewards = part.new_zeros(len(data))
        rewards[rows.to(part.device)] = part
        values.append(value)
        losses += part_losses
        examples = plan.num_examples
    return Scored(rewards, torch.stack(values).mean(), losses, examples)


def _metagradients(target, data, phi, inner, order, grad_reduce, times, progress):
    return metagradient_rewards(target, data, phi, inner, order, times=times,
                                grad_reduce=grad_reduce, progress=progress)


def _dataset_rewards(target, data, phi, inner, order, grad_reduce, times, progress):
    start = time.perf_counter()
    out = dataset_reward(target, data, phi, inner, order, grad_reduce, progress)
    times["inner_sft"] = times.get("inner_sft", 0.0) + time.perf_counter() - start
    return out


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


class _Scoring:
    """What both rewards share: run their attribution on the step's set, or per inverse group."""

    attribute: Attribute
    grouped: bool

    def score(
        self, target: nn.Module, data: TokenRows, phi: MetricFn, inner: InnerConfig,
        plan_for: PlanFor, samples_per_prompt: int, times: dict[str, float],
        progress: Progress | None = None,
    ) -> Scored:
        groups = inverse_groups(len(data), samples_per_prompt) if self.grouped else None
        return score_sfts(type(self).attribute, target, data, phi, inner, plan_for, groups,
                          times, progress)


class MetagradientReward(_Scoring):
    """``reward: dpg``: ``r_i = dPhi/deps_i``, advantages within groups or the batch."""

    attribute = staticmethod(_metagradients)

    def __init__(self, grouped: bool = False) -> None:
        self.grouped = grouped

    def advantages(
        self, rewards: Tensor, all_rewards: Tensor, world: WorldInfo, shared: bool,
        samples_per_prompt: int, policy: PolicyConfig,
    ) -> Tensor:
        return batch_advantages(rewards, all_rewards, world, shared, samples_per_prompt, policy)


class DatasetReward(_Scoring, nn.Module):
    """``reward: dataset``: every example gets ``Phi`` of its SFT. With inverse groups the
    groups' Phi are compared within the step (``policy.baseline`` / ``scale_rewards``, the
    paper's: the batch); else the step's one Phi is compared with a moving average of earlier
    steps' Phi (a module: the average is checkpointed)."""

    attribute = staticmethod(_dataset_rewards)

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
