"""Stop a run that has stopped producing finite numbers, and say what diverged.

One non-finite step (rewards, Phi after the inner SFT, or an inner loss) is skipped: the
policy update would poison the generator, and a rare overflow should not end a long run. A
run whose steps stay non-finite, though, only burns its allocation while it logs NaN and
saves checkpoints: after ``limit`` consecutive such steps :class:`DivergenceGuard` raises
:class:`~dpg_lightning.common.errors.TrainingDiverged`, whose message names what was non-finite and
which settings to lower, and the CLI exits non-zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dpg_lightning.common.errors import TrainingDiverged


@dataclass
class StepNumbers:
    """What one training step produced, over all ranks: every example's reward, each rank's
    Phi after its inner SFT, and the inner SFT's step losses."""

    rewards: Tensor
    phis: Tensor
    losses: list[Tensor]

    def problems(self) -> list[str]:
        """What is non-finite, in words (empty when everything is finite)."""
        out = []
        bad = (~torch.isfinite(self.rewards)).sum().item()
        if bad:
            out.append(f"{bad} of {self.rewards.numel()} rewards")
        if not torch.isfinite(self.phis).all():
            out.append(f"Phi after the inner SFT ({_values(self.phis)})")
        bad_steps = [i for i, loss in enumerate(self.losses) if not torch.isfinite(loss).all()]
        if bad_steps:
            out.append(f"the inner loss at {len(bad_steps)} of {len(self.losses)} inner steps "
                       f"(first at step {bad_steps[0]})")
        return out


def _values(t: Tensor) -> str:
    return ", ".join(f"{v:g}" for v in t.flatten().tolist()[:4])


def _settings(hints: list[tuple[str, object]]) -> str:
    """``key`` (now value), ... for the settings worth lowering."""
    return ", ".join(
        f"`{key}` (now {value:g})" if isinstance(value, float) else f"`{key}` (now {value})"
        for key, value in hints
    )


class DivergenceGuard:
    """Counts consecutive non-finite training steps; raises once ``limit`` are reached.

    Args:
        limit: consecutive non-finite steps that end the run (``model.max_nonfinite_steps``).
        hints: settings worth lowering, ``(key, value)``, named in the final message.
    """

    def __init__(self, limit: int, hints: list[tuple[str, object]]) -> None:
        self.limit, self.hints = limit, hints
        self.streak = 0
        self.last: tuple[int, list[str]] = (0, [])

    def record(self, step: int, problems: list[str]) -> None:
        """Count ``step`` with its :meth:`StepNumbers.problems` (empty: a good step, the count
        restarts)."""
        self.streak = self.streak + 1 if problems else 0
        if problems:
            self.last = (step, problems)

    def raise_if_diverged(self) -> None:
        """Raise once ``limit`` consecutive steps had problems. Called between steps, after
        the last one's metrics reached the loggers."""
        if self.streak < self.limit:
            return
        step, problems = self.last
        raise TrainingDiverged(
            f"training diverged: {self.streak} consecutive steps up to step {step} had "
            f"non-finite numbers (at step {step}: {'; '.join(problems)}); every policy update "
            f"was skipped. Lower {_settings(self.hints)}, then start again (checkpoints saved "
            "before the divergence are kept). `model.max_nonfinite_steps` sets how many such "
            "steps are tolerated"
        )


def check_validation_phi(value: float, step: int, hints: list[tuple[str, object]]) -> None:
    """A non-finite validation Phi ends the run at once: no checkpoint may be chosen by it."""
    if math.isfinite(value):
        return
    lower = _settings(hints)
    raise TrainingDiverged(
        f"validation Phi is {value} at step {step}: the plain inner SFT on the generator's "
        f"samples diverged (or the metric is not finite after it), so no checkpoint can be "
        f"ranked by it. Lower {lower}"
    )
