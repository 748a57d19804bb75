"""The generator's learning-rate schedule: warmup, then constant, cosine or linear decay.

RL fine-tuning of LMs (TRL's GRPO trainer, verl) warms the policy's lr up over the first
updates and then holds it or decays it; the schedules here are transformers' own
(``get_constant_schedule_with_warmup``, ``get_cosine_with_min_lr_schedule_with_warmup``,
``get_linear_schedule_with_warmup``), so a setting means what it means there. The unit is the
DPG step, not the PPO update: the module steps the schedule once per DPG step (updated or
skipped), so every PPO update of a step uses the same lr and the schedule follows
``trainer.global_step`` and ``trainer.max_steps``.

As in transformers, the schedule's first value is ``lr * 0 / warmup_steps``: with
``warmup_steps > 0`` the first DPG step does not move the generator (the HF trainers step the
schedule after the update, exactly as here).

The scheduler is a ``LambdaLR`` whose state (its step count) Lightning checkpoints with the
optimizer when :func:`generator_optimizers` is what ``configure_optimizers`` returns, so a
resumed run continues the schedule where it stopped.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from dpg_lightning.common.errors import require

LRSchedule = Literal["constant", "cosine", "linear"]


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """The schedule over ``total_steps`` DPG steps (``trainer.max_steps``; ``-1``: not set,
    which only ``constant`` accepts). ``min_lr_ratio``: cosine decays to ``lr *
    min_lr_ratio`` (0: to 0, transformers' plain cosine)."""
    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    require(total_steps > 0,
            f"`model.policy.lr_schedule: {schedule}` decays over the run, so it needs "
            "`trainer.max_steps` (the number of DPG steps); set it, or use `constant`",
            "lr_schedule")
    require(warmup_steps <= total_steps,
            f"`model.policy.warmup_steps` ({warmup_steps}) exceeds `trainer.max_steps` "
            f"({total_steps}): the {schedule} decay would never start", "warmup_steps")
    if schedule == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup_steps, total_steps, min_lr_rate=min_lr_ratio)
    return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)


def generator_optimizers(params: Any, policy: Any, max_steps: int) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: the generator's AdamW and its schedule, stepped
    by hand once per DPG step (``interval: step`` for the record; manual optimization leaves
    stepping to the module)."""
    opt = torch.optim.AdamW(params, lr=policy.lr, weight_decay=policy.weight_decay,
                            betas=policy.betas)
    scheduler = lr_scheduler(opt, policy.lr_schedule, policy.warmup_steps, max_steps,
                             policy.min_lr_ratio)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
