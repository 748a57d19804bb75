"""One DPG step's inner SFTs and their scoring, as plain functions (no Lightning).

A step's synthetic set is fine-tuned on once as a whole (``model.sft_groups: all``) or, with
``inverse``, once per *inverse group*: group k holds the k-th sample of every prompt, so each
prompt has one sample in every group. The paper's naive baseline is the dataset reward with
inverse groups; its "no cross-group batching" ablation is the metagradient with inverse groups.

:func:`sft_jobs` lists the SFTs of a step (their rows and this rank's order, seeded by the step
and the group, so resumes and ranks agree), :func:`attribution_for` picks how an SFT's examples
are rewarded (``model.reward``), and :func:`score_step` runs them all and puts every reward
back in its row. Advantages are :mod:`dpg_lightning.dpg.rewards`'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpg_lightning.common.seeds import derive_seed
from dpg_lightning.data.tokenization import TokenRows
from dpg_lightning.dpg.rollout import Rollout
from dpg_lightning.example_rewards.base import ExampleReward, score_examples
from dpg_lightning.inner.attribution import dataset_reward, metagradient_rewards
from dpg_lightning.inner.attribution_result import Attribute, Attribution
from dpg_lightning.inner.config import InnerConfig
from dpg_lightning.inner.metric import MetricFn
from dpg_lightning.inner.set_size import SFTSet
from dpg_lightning.inner.shared_sft import Mode, RankOrder, WorldInfo, rank_order
from dpg_lightning.inner.steps import Progress


@dataclass(frozen=True)
class SFTJob:
    """One SFT of a step: which of this rank's rows it trains on (``None``: all of them, in
    their order) and this rank's order of it."""

    rows: Tensor | None
    order: RankOrder


@dataclass
class StepScore:
    """A step's SFTs, scored: this rank's rewards (one per row of its set), ``Phi`` after the
    SFT (the groups' mean with inverse groups), all step losses, the examples in one SFT (all
    ranks'), and the wall time of the SFTs' parts summed over them. A per-example reward
    (``reward: example``) runs no SFT: ``phi`` is ``None`` and ``losses`` empty."""

    rewards: Tensor
    phi: Tensor | None
    losses: list[Tensor]
    num_examples: int
    seconds: dict[str, float]


def inverse_groups(n: int, samples_per_prompt: int) -> list[Tensor]:
    """Local indices of group k = the k-th sample of every prompt (rows are prompt-major)."""
    return [torch.arange(k, n, samples_per_prompt) for k in range(samples_per_prompt)]


def sft_jobs(
    sft_set: SFTSet, inner: InnerConfig, seed: int, step: int, mode: Mode, world: WorldInfo
) -> list[SFTJob]:
    """The SFTs of step ``step`` on this rank, their batch size by :class:`SFTSet`'s rule.

    The whole set's order is seeded by ``(seed, step)``, an inverse group's by ``(seed, step,
    group)``: the same on every rank, so a shared SFT's ranks shard one global order.
    """
    batch = sft_set.batch(inner.batch_size)
    if not sft_set.inverse_groups:
        order_seed = derive_seed(seed, "inner_order", step)
        return [SFTJob(None, rank_order(sft_set.per_rank, batch, inner.shuffle, order_seed,
                                        mode, world))]
    return [
        SFTJob(rows, rank_order(len(rows), batch, inner.shuffle,
                                derive_seed(seed, "inner_order", step, group), mode, world))
        for group, rows in enumerate(inverse_groups(sft_set.per_rank, sft_set.samples_per_prompt))
    ]


def attribution_for(reward: str) -> Attribute:
    """How an SFT's examples are rewarded: ``dpg``, the metagradient (on ``inner.backend``);
    ``dataset``, Phi of the SFT for every example. Looked up at each call, so tests can
    substitute either."""
    return metagradient_rewards if reward == "dpg" else dataset_reward


def _subset(data: TokenRows, rows: Tensor) -> TokenRows:
    rows = rows.to(data.input_ids.device)
    return TokenRows(data.input_ids[rows], data.attention_mask[rows], data.labels[rows])


def _add_seconds(total: dict[str, float], part: dict[str, float]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + value


def score_step(
    attribute: Attribute,
    target: nn.Module,
    data: TokenRows,
    phi: MetricFn,
    inner: InnerConfig,
    jobs: list[SFTJob],
    progress: Progress | None = None,
) -> StepScore:
    """Run ``attribute`` on every SFT of the step and put each reward in its row."""
    rewards: Tensor | None = None
    parts: list[Attribution] = []
    seconds: dict[str, float] = {}
    for job in jobs:
        part = attribute(target, data if job.rows is None else _subset(data, job.rows), phi,
                         inner, job.order, progress)
        _add_seconds(seconds, part.seconds)
        parts.append(part)
        if job.rows is None:
            rewards = part.rewards
            continue
        if rewards is None:
            rewards = part.rewards.new_zeros(len(data))
        rewards[job.rows.to(part.rewards.device)] = part.rewards
    assert rewards is not None, "a step has at least one SFT"
    value = parts[0].phi if len(parts) == 1 else torch.stack([p.phi for p in parts]).mean()
    losses = [loss for p in parts for loss in p.losses]
    return StepScore(rewards, value, losses, jobs[-1].order.num_examples, seconds)


def score_by_example_reward(reward: ExampleReward, rollout: Rollout) -> StepScore:
    """``reward: example``: each completion scored on its own by ``reward`` (its text, the
    generator's token ids of it, its prompt), with no inner SFT: the paper's heuristic
    baselines (``dpg_lightning.example_rewards``)."""
    start = time.perf_counter()
    token_ids = [row[mask.bool()].tolist()
                 for row, mask in zip(rollout.completion_ids, rollout.completion_mask)]
    rewards = score_examples(reward, rollout.texts, token_ids, rollout.prompts)
    seconds = {"example_reward": time.perf_counter() - start}
    return StepScore(rewards.to(rollout.input_ids.device), None, [], len(rollout.texts), seconds)
