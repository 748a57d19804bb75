"""The generator's policy-gradient loss: REINFORCE / PPO-clip with an optional KL penalty.

Each sequence's loss is the *sum* over its completion tokens, averaged over sequences, so with
one update per rollout the gradient is the unbiased REINFORCE estimate of
``grad E[reward] = E[A * grad log pi(sequence)]`` (tested on an enumerable policy). Names follow
TRL's GRPO trainer: ``epsilon`` is the clip range, ``beta`` the KL coefficient (k3 estimator to a
frozen copy of the initial generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dpg_lightning.advantages import Baseline, Scale


@dataclass
class PolicyConfig:
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


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon: float | None = None,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy-gradient loss over ``[N, T]`` token log-probs; returns ``(loss, stats)``."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    surrogate = ratio * adv
    if epsilon is not None:
        clipped = ratio.clamp(1 - epsilon, 1 + epsilon) * adv
        per_token = -torch.minimum(surrogate, clipped)
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
    loss = (per_token * mask).sum(1).mean()
    return loss, {"clip_frac": clip_frac.detach(), "kl": kl.detach()}
