"""Stop a run that has stopped producing finite numbers, and say what diverged and why.

One non-finite step (rewards, Phi after the inner SFT, or an inner loss) is skipped: the
policy update would poison the generator, and a rare overflow should not end a long run. A
run whose steps stay non-finite, though, only burns its allocation while it logs NaN and
saves checkpoints: after ``limit`` consecutive such steps :class:`DivergenceGuard` raises
:class:`~dpg_lightning.common.errors.TrainingDiverged`, whose message names what was
non-finite, its likely cause (:func:`likely_causes`) and which settings to lower, and the CLI
exits non-zero. The cause matters because the usual advice is wrong for the commonest case:
Adam with ``eps_root: 0`` gives NaN rewards at any inner lr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dpg_lightning.common.errors import TrainingDiverged
from dpg_lightning.inner.config import InnerConfig


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
        if not self.phi_finite():
            out.append(f"Phi after the inner SFT ({_values(self.phis)})")
        bad_steps = self.bad_loss_steps()
        if bad_steps:
            out.append(f"the inner loss at {len(bad_steps)} of {len(self.losses)} inner steps "
                       f"(first at step {bad_steps[0]})")
        return out

    def phi_finite(self) -> bool:
        return bool(torch.isfinite(self.phis).all())

    def bad_loss_steps(self) -> list[int]:
        """Inner steps whose loss is not finite (in any of the step's SFTs)."""
        return [i for i, loss in enumerate(self.losses) if not torch.isfinite(loss).all()]

    def loss_growth(self) -> tuple[float, float] | None:
        """``(first, last)`` mean inner loss when the SFT made it larger (else ``None``)."""
        if len(self.losses) < 2 or self.bad_loss_steps():
            return None
        first, last = float(self.losses[0].mean()), float(self.losses[-1].mean())
        return (first, last) if last > first else None


def _adam_eps_root_zero(inner: InnerConfig) -> bool:
    return inner.optim.name in ("adam", "adamw") and inner.optim.eps_root == 0


def likely_causes(numbers: StepNumbers | None, inner: InnerConfig) -> list[str]:
    """Why the numbers of a step (``None``: a validation's plain SFT) are not finite, most
    likely first, from which of them failed and the inner settings."""
    lr = f"`model.inner.optim.lr` (now {inner.optim.lr:g})"
    out = []
    bad_losses = numbers.bad_loss_steps() if numbers is not None else []
    growth = numbers.loss_growth() if numbers is not None else None
    if bad_losses:
        out.append(f"the inner SFT diverged (its loss is not finite from inner step "
                   f"{bad_losses[0]}): {lr} is too large for this target")
    elif growth is not None:
        out.append(f"the inner loss grew over the SFT ({growth[0]:.4g} -> {growth[1]:.4g}): "
                   f"{lr} is likely too large")
    only_rewards = (numbers is not None and not bad_losses and numbers.phi_finite()
                    and not bool(torch.isfinite(numbers.rewards).all()))
    if only_rewards and _adam_eps_root_zero(inner):
        out.insert(0, f"the inner optimizer is {inner.optim.name} with "
                   "`model.inner.optim.eps_root` 0: its metagradient is NaN wherever a second "
                   "moment is 0 (a parameter no inner batch gives a gradient, e.g. the "
                   "embedding of a token no example holds), whatever the lr; set "
                   "`model.inner.optim.eps_root: 1e-9` (the paper's value and the default)")
    elif only_rewards:
        out.append("the metagradient (the backward pass through the inner SFT) overflowed "
                   f"while the SFT itself stayed finite: lower {lr} or the inner steps")
    elif numbers is not None and not numbers.phi_finite() and not bad_losses:
        out.append("the metric is not finite on the fine-tuned target although every inner "
                   "loss is: check the metric, or lower the inner lr")
    if inner.autocast != "none":
        out.append(f"`model.inner.autocast: {inner.autocast}` overflows where full precision "
                   "does not: try `none`")
    return out


def _values(t: Tensor) -> str:
    return ", ".join(f"{v:g}" for v in t.flatten().tolist()[:4])


def _settings(hints: list[tuple[str, object]]) -> str:
    """``key`` (now value), ... for the settings worth lowering."""
    return ", ".join(
        f"`{key}` (now {value:g})" if isinstance(value, float) else f"`{key}` (now {value})"
        for key, value in hints
    )


def _because(causes: list[str]) -> str:
    return f" Likely cause: {'; or '.join(causes)}." if causes else ""


class DivergenceGuard:
    """Counts consecutive non-finite training steps; raises once ``limit`` are reached.

    Args:
        limit: consecutive non-finite steps that end the run (``model.max_nonfinite_steps``).
        hints: settings worth lowering, ``(key, value)``, named in the final message.
        inner: the inner settings, to name the likely cause (:func:`likely_causes`).
    """

    def __init__(self, limit: int, hints: list[tuple[str, object]],
                 inner: InnerConfig | None = None) -> None:
        self.limit, self.hints, self.inner = limit, hints, inner
        self.streak = 0
        self.last: tuple[int, list[str]] = (0, [])
        self.causes: list[str] = []

    def record(self, step: int, problems: list[str], causes: list[str] | None = None) -> None:
        """Count ``step`` with its :meth:`StepNumbers.problems` (empty: a good step, the count
        restarts) and their likely ``causes``."""
        self.streak = self.streak + 1 if problems else 0
        if problems:
            self.last, self.causes = (step, problems), list(causes or [])

    def record_step(self, step: int, numbers: StepNumbers) -> list[str]:
        """:meth:`record` a step's numbers, diagnosed; returns their problems."""
        problems = numbers.problems()
        causes = likely_causes(numbers, self.inner) if problems and self.inner else []
        self.record(step, problems, causes)
        return problems

    def raise_if_diverged(self) -> None:
        """Raise once ``limit`` consecutive steps had problems. Called between steps, after
        the last one's metrics reached the loggers."""
        if self.streak < self.limit:
            return
        step, problems = self.last
        raise TrainingDiverged(
            f"training diverged: {self.streak} consecutive steps up to step {step} had "
            f"non-finite numbers (at step {step}: {'; '.join(problems)}); every policy update "
            f"was skipped.{_because(self.causes)} Otherwise lower {_settings(self.hints)}, "
            "then start again (checkpoints saved before the divergence are kept). "
            "`model.max_nonfinite_steps` sets how many such steps are tolerated"
        )

    def check_validation_phi(self, value: float, step: int) -> None:
        """:func:`check_validation_phi` with this run's hints and likely causes."""
        causes = likely_causes(None, self.inner) if self.inner else []
        check_validation_phi(value, step, self.hints, causes)


def check_validation_phi(value: float, step: int, hints: list[tuple[str, object]],
                         causes: list[str] | None = None) -> None:
    """A non-finite validation Phi ends the run at once: no checkpoint may be chosen by it."""
    if math.isfinite(value):
        return
    lower = _settings(hints)
    raise TrainingDiverged(
        f"validation Phi is {value} at step {step}: the plain inner SFT on the generator's "
        f"samples diverged (or the metric is not finite after it), so no checkpoint can be "
        f"ranked by it.{_because(causes or [])} Lower {lower}"
    )
