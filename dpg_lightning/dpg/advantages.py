"""Advantages from rewards: per-example baselines and scale-free normalisation, and the
moving baseline of the dataset-level reward.

DPG rewards are metagradients, often ~1e-9 in magnitude. A normaliser ``std + 1e-6`` (the usual
GRPO constant) would swamp them, so the guard here is *relative*: a set whose spread is below
``rel_tol`` times its magnitude counts as all-equal and gets zero advantage (never NaN).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

Baseline = Literal["none", "batch_mean", "leave_one_out", "group"]
Scale = Literal["group", "batch", "none"]


def _centre(r: Tensor, baseline: Baseline) -> Tensor:
    """``r`` shaped ``[num_prompts, samples_per_prompt]`` minus the chosen baseline."""
    if baseline == "none":
        return r
    if baseline == "group":
        return r - r.mean(1, keepdim=True)
    n = r.numel()
    if baseline == "batch_mean":
        return r - r.mean()
    if baseline == "leave_one_out":
        if n == 1:
            return torch.zeros_like(r)
        return r - (r.sum() - r) / (n - 1)
    raise ValueError(
        f"unknown baseline {baseline!r}: use none | batch_mean | leave_one_out | group"
    )


def _scale(x: Tensor, r: Tensor, dim: int | None, rel_tol: float) -> Tensor:
    """Divide ``x`` by the std of ``r`` (over ``dim``; all if None), zero where std is ~0."""
    if dim is None:
        std, mag = r.std(unbiased=False), r.abs().max()
    else:
        std = r.std(dim, unbiased=False, keepdim=True)
        mag = r.abs().amax(dim, keepdim=True)
    flat = std <= rel_tol * mag
    safe = torch.where(flat, torch.ones_like(std), std)
    return torch.where(flat, torch.zeros_like(x), x / safe)


def grpo_official_advantages(rewards: Tensor, samples_per_prompt: int, scale: float) -> Tensor:
    """The paper's RL framework's GRPO advantages: per prompt group ``(r - mean) / (std + 1e-6)``
    of ``scale * r``, with the unbiased std (0 for a group of one).

    On metagradient rewards (~1e-9 even after the paper's ``scale``, the micro-batch size) the
    absolute ``1e-6`` dominates the std, so these advantages are the mean-centred rewards times
    ~1e6: their size follows the rewards' size. :func:`compute_advantages` is scale-free.
    """
    r = scale * rewards.reshape(-1, samples_per_prompt).to(torch.float64)
    std = r.std(1, unbiased=True, keepdim=True) if samples_per_prompt > 1 else torch.zeros_like(r)
    adv = (r - r.mean(1, keepdim=True)) / (std + 1e-6)
    return adv.reshape(-1).to(rewards.dtype)


def compute_advantages(
    rewards: Tensor,
    samples_per_prompt: int,
    baseline: Baseline = "group",
    scale_rewards: Scale = "group",
    rel_tol: float = 1e-6,
) -> Tensor:
    """Advantages for rewards ordered prompt-major (``[p0s0, p0s1, ..., p1s0, ...]``).

    ``scale_rewards`` (TRL's name) divides by the std of the rewards in each group or in the
    batch; it never changes the sign of an advantage and is invariant to the rewards' scale.
    A group of size 1 has no comparison: the ``group`` baseline gives it zero advantage.
    """
    r = rewards.reshape(-1, samples_per_prompt).to(torch.float64)
    adv = _centre(r, baseline)
    if scale_rewards == "group":
        adv = _scale(adv, r, 1, rel_tol)
    elif scale_rewards == "batch":
        adv = _scale(adv, r, None, rel_tol)
    elif scale_rewards != "none":
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}: use group | batch | none")
    return adv.reshape(-1).to(rewards.dtype)


class RunningPhi(nn.Module):
    """Exponential moving mean and variance of ``Phi`` over earlier steps (``reward: dataset``).

    With the dataset-level reward every example of a step gets the same ``Phi(SFT(D))``, so a
    baseline within the step would zero every advantage; the step is compared with earlier
    steps instead. The moments are buffers, so they are checkpointed with the run and a resume
    continues the same average.

    Args:
        decay: weight of the past in the moving averages (``policy.dataset_baseline_decay``).
    """

    def __init__(self, decay: float = 0.9) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def advantage(self, value: Tensor, baseline: Baseline, scale_rewards: Scale) -> Tensor:
        """The advantage of this step's ``Phi`` (a scalar), then fold it into the averages.

        ``baseline: none`` leaves ``Phi`` as it is; any other baseline subtracts the moving mean
        (zero advantage at the first step, which has nothing to compare with). Unless
        ``scale_rewards`` is ``none`` the result is divided by the moving std, and is zero while
        that is unknown (fewer than 2 steps) or negligible against ``Phi``.
        """
        value = value.detach().double()
        if baseline == "none":
            centred = value
        else:
            centred = value - self.mean if self.count > 0 else torch.zeros_like(value)
        if scale_rewards != "none":
            std = self.var.clamp(min=0).sqrt()
            flat = self.count < 2 or std <= 1e-6 * value.abs()
            centred = torch.zeros_like(value) if flat else centred / std
        delta = value - self.mean
        if self.count == 0:
            self.mean.copy_(value)
        else:
            self.mean += (1 - self.decay) * delta
            self.var.copy_(self.decay * (self.var + (1 - self.decay) * delta * delta))
        self.count += 1
        return centred
