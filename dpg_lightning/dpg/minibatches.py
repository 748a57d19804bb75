"""The PPO mini-batches of one pass over a step's rollouts (``model.policy``).

Plain functions of the settings, so the module's update loop only iterates them and tests check
them without a module.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpg_lightning.dpg.policy import PolicyConfig


def minibatch_count(policy: PolicyConfig, samples_per_prompt: int, n_rows: int) -> int:
    """Optimizer steps per pass over this rank's ``n_rows`` samples."""
    if policy.minibatch_prompts is None:
        return policy.num_minibatches
    return max(1, -(-(n_rows // samples_per_prompt) // policy.minibatch_prompts))


def minibatch_rows(
    policy: PolicyConfig, samples_per_prompt: int, n_rows: int, count: int,
    device: torch.device | str = "cpu",
) -> list[Tensor | None]:
    """Rows of each mini-batch of one pass, in a random order (``[None]``: all rows).

    With ``policy.minibatch_prompts`` the samples of a prompt stay together (the paper's
    mini-batches are counted in prompts); else rows are shuffled one by one.
    """
    if count == 1:
        return [None]
    if policy.minibatch_prompts is None:
        return list(torch.randperm(n_rows, device=device).chunk(count))
    prompts = torch.randperm(n_rows // samples_per_prompt, device=device)
    rows = prompts[:, None] * samples_per_prompt + torch.arange(samples_per_prompt, device=device)
    return [chunk.reshape(-1) for chunk in rows.split(policy.minibatch_prompts)]
