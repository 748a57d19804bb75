"""Advantages from per-example rewards: baselines and scale-free normalisation.

DPG rewards are metagradients, often ~1e-9 in magnitude. A normaliser ``std + 1e-6`` (the usual
GRPO constant) would swamp them, so the guard here is *relative*: a set whose spread is below
``rel_tol`` times its magnitude counts as all-equal and gets zero advantage (never NaN).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

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
