"""The generator's policy-gradient loss: REINFORCE / PPO-clip with an optional KL penalty.

Each sequence's loss is the *sum* over its completion tokens, averaged over sequences, so with
one update per rollout the gradient is the unbiased REINFORCE estimate of
``grad E[reward] = E[A * grad log pi(sequence)]`` (tested on an enumerable policy). Names follow
TRL's GRPO trainer: ``epsilon`` is the clip range, ``beta`` the KL coefficient (k3 estimator to a
frozen copy of the initial generator).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dpg_lightning.common.errors import check_int_at_least, check_positive, require
from dpg_lightning.common.settings import Settings
from dpg_lightning.dpg.advantages import Baseline, Scale
from dpg_lightning.dpg.lr_schedule import LRSchedule


@dataclass
class PolicyConfig(Settings):
    """Generator update settings.

    Attributes:
        baseline: ``none | batch_mean | leave_one_out | group`` (group = per prompt, GRPO).
        scale_rewards: divide by the reward std of each ``group``, the ``batch``, or ``none``.
        beta: KL penalty to the initial generator (0 disables it and the reference copy).
        epsilon: PPO clip range; ``None`` for plain REINFORCE (no ratio clipping).
        num_iterations: passes over each rollout (PPO epochs); >1 needs ``epsilon``.
        num_minibatches: optimizer steps per pass, each on a slice of the rollout.
        max_grad_norm: clip the generator's gradient norm (``None`` disables).
        lr, weight_decay, betas: the generator's AdamW.
        dataset_baseline_decay: ``reward: dataset`` only: weight of the past in the moving
            average of Phi that each step is compared with
            (:class:`~dpg_lightning.dpg.advantages.RunningPhi`).
        minibatch_prompts: PPO mini-batches by prompts: each optimizer step takes the samples
            of this many prompts (the paper's 32); overrides ``num_minibatches``.
        micro_batch_size: rollouts per forward/backward inside one mini-batch, their gradients
            accumulated before its optimizer step (``None``: the whole mini-batch at once). A
            memory knob only: the update is the unsplit mini-batch's, so the paper's mini-batch
            of 32 prompts fits on one GPU without changing the experiment (fewer prompts per
            mini-batch would also change the number of optimizer steps per DPG step).
        loss_aggregation: ``sequence_sum`` (default: each sequence's summed token losses,
            averaged over sequences: the unbiased REINFORCE estimate) or ``token_mean`` (the
            paper's RL framework: the mean over all completion tokens of the mini-batch).
        dual_clip: the dual-clip constant ``c`` (> 1, the paper's 3): a negative advantage's
            loss is bounded by ``-c * A`` however large the ratio; ``None`` disables it.
        advantage_normalization: ``scale_free`` (default, see
            :mod:`dpg_lightning.dpg.advantages`) or ``grpo_official``: per prompt group
            ``(r - mean) / (std_unbiased + 1e-6)`` of the rewards times ``reward_scale``.
        reward_scale: rewards are multiplied by it before ``grpo_official`` normalisation (the
            paper's reward is the micro-batch size times dPhi/deps; at ~1e-9 the 1e-6 then
            dominates the std, so its advantages are effectively only mean-centred).
        lr_schedule: the generator's lr over the run (:mod:`dpg_lightning.dpg.lr_schedule`):
            ``constant`` (default), ``cosine`` or ``linear`` decay over ``trainer.max_steps``.
        warmup_steps: DPG steps of linear warmup from 0 before the schedule (0: none).
        min_lr_ratio: ``cosine`` only: the lr it decays to, as a fraction of ``lr``.
    """

    baseline: Baseline = "group"
    scale_rewards: Scale = "group"
    beta: float = 0.0
    epsilon: float | None = 0.2
    num_iterations: int = 1
    num_minibatches: int = 1
    max_grad_norm: float | None = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    dataset_baseline_decay: float = 0.9
    minibatch_prompts: int | None = None
    micro_batch_size: int | None = None
    loss_aggregation: Literal["sequence_sum", "token_mean"] = "sequence_sum"
    dual_clip: float | None = None
    advantage_normalization: Literal["scale_free", "grpo_official"] = "scale_free"
    reward_scale: float = 1.0
    lr_schedule: LRSchedule = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def check(self) -> None:
        """Bounds and the options that need ``epsilon`` (the choices are checked from the
        annotations); ``betas`` becomes a tuple (YAML gives a list)."""
        check_positive("beta", self.beta, allow_zero=True)
        if self.epsilon is not None:
            check_positive("epsilon", self.epsilon)
        check_int_at_least("num_iterations", self.num_iterations, 1)
        check_int_at_least("num_minibatches", self.num_minibatches, 1)
        require(
            self.num_iterations == 1 or self.epsilon is not None,
            f"`num_iterations` is {self.num_iterations} but `epsilon` is null: later passes "
            "over a rollout are off-policy and need the PPO clip; set `epsilon` (e.g. 0.2) or "
            "`num_iterations: 1`",
            "num_iterations", "epsilon",
        )
        if self.max_grad_norm is not None:
            check_positive("max_grad_norm", self.max_grad_norm)
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        self.betas = tuple(self.betas)
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"`betas` is {list(self.betas)}; give two values in [0, 1), e.g. [0.9, 0.999]",
            "betas",
        )
        if self.minibatch_prompts is not None:
            check_int_at_least("minibatch_prompts", self.minibatch_prompts, 1)
        if self.micro_batch_size is not None:
            check_int_at_least("micro_batch_size", self.micro_batch_size, 1)
        require(
            self.dual_clip is None or (self.dual_clip > 1 and self.epsilon is not None),
            f"`dual_clip` is {self.dual_clip}; it must be > 1 (e.g. 3) and needs `epsilon`, "
            "or null",
            "dual_clip", "epsilon",
        )
        check_positive("reward_scale", self.reward_scale)
        check_int_at_least("warmup_steps", self.warmup_steps, 0)
        require(0 <= self.min_lr_ratio <= 1,
                f"`min_lr_ratio` is {self.min_lr_ratio}; it must be in [0, 1]", "min_lr_ratio")
        require(self.min_lr_ratio == 0 or self.lr_schedule == "cosine",
                f"`min_lr_ratio` ({self.min_lr_ratio}) is for `lr_schedule: cosine`, not "
                f"{self.lr_schedule}", "min_lr_ratio", "lr_schedule")
        require(
            0 <= self.dataset_baseline_decay < 1,
            f"`dataset_baseline_decay` is {self.dataset_baseline_decay}; it must be in [0, 1)",
            "dataset_baseline_decay",
        )


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon: float | None = None,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    dual_clip: float | None = None,
    aggregation: str = "sequence_sum",
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy-gradient loss over ``[N, T]`` token log-probs; returns ``(loss, stats)``.

    ``dual_clip`` bounds a negative advantage's per-token loss by ``-dual_clip * A`` (dual-clip
    PPO, as in the paper's RL framework). ``aggregation``: ``sequence_sum`` sums each
    sequence's token losses and averages over sequences; ``token_mean`` averages over all
    tokens of the batch. ``denominator`` replaces that average's count (sequences or tokens)
    when these rows are one micro-batch of a larger mini-batch: the mini-batch's count makes
    the micro-batches' losses sum to the mini-batch's. The stats are this call's token means.
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    surrogate = ratio * adv
    if epsilon is not None:
        clipped = ratio.clamp(1 - epsilon, 1 + epsilon) * adv
        per_token = -torch.minimum(surrogate, clipped)
        if dual_clip is not None:
            bounded = torch.minimum(per_token, -dual_clip * adv)
            per_token = torch.where(adv < 0, bounded, per_token)
        clip_frac = ((surrogate > clipped).to(logp.dtype) * mask).sum() / mask.sum().clamp(min=1)
    else:
        per_token = -surrogate
        clip_frac = torch.zeros((), dtype=logp.dtype, device=logp.device)
    kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if beta and ref_logp is not None:
        delta = ref_logp - logp
        per_token_kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * per_token_kl
        kl = (per_token_kl * mask).sum() / mask.sum().clamp(min=1)
    if denominator is not None:
        loss = (per_token * mask).sum() / denominator
    elif aggregation == "token_mean":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:
        loss = (per_token * mask).sum(1).mean()
    return loss, {"clip_frac": clip_frac.detach(), "kl": kl.detach()}


def accumulate_policy_loss(
    logprobs: Callable[[Tensor | None], Tensor],
    backward: Callable[[Tensor], None],
    rows: Tensor | None,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    micro_batch_size: int | None = None,
    ref_logp: Tensor | None = None,
    **loss_kwargs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One mini-batch's :func:`policy_loss`, computed and backpropagated micro-batch by
    micro-batch; returns the mini-batch's loss and token-mean stats.

    ``logprobs(chunk)`` gives the current policy's ``[n, T]`` log-probs of the rollout rows
    ``chunk`` (``None``: all rows); ``backward`` is the caller's backward (Lightning's
    ``manual_backward``). ``rows`` are the mini-batch's rows of the rollout (``None``: all).
    Each micro-batch's loss is divided by the mini-batch's count, so the accumulated gradient
    is the unsplit mini-batch's; only one micro-batch's graph is alive at a time.
    """
    n = len(mask) if rows is None else len(rows)
    if micro_batch_size is None or micro_batch_size >= n:
        chunks: list[Tensor | None] = [rows]
    else:
        chunks = list((torch.arange(n, device=mask.device) if rows is None else rows)
                      .split(micro_batch_size))
    sel = slice(None) if rows is None else rows
    tokens = mask[sel].sum().clamp(min=1)
    denominator = (None if len(chunks) == 1  # one piece: policy_loss's own (bit-identical)
                   else tokens if loss_kwargs.get("aggregation") == "token_mean" else n)
    total = torch.zeros((), dtype=old_logp.dtype, device=old_logp.device)
    stats: dict[str, Tensor] = {}
    for chunk in chunks:
        c = slice(None) if chunk is None else chunk
        loss, s = policy_loss(logprobs(chunk), old_logp[c], advantages[c], mask[c],
                              ref_logp=None if ref_logp is None else ref_logp[c],
                              denominator=denominator, **loss_kwargs)
        backward(loss)
        total = total + loss.detach()
        share = mask[c].sum().to(old_logp.dtype) / tokens
        for k, v in s.items():
            stats[k] = stats.get(k, 0) + v * share.to(v.dtype)
    return total, stats
