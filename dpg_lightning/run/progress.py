"""A progress bar that shows where a DPG step is, not an epoch count.

At paper scale one DPG step takes minutes, so Lightning's bar (``Epoch 0/-2``, ``v_num``) says
nothing for a long time. This one counts steps against ``trainer.max_steps`` and shows the
step's current phase with its own progress: ``rollout``, ``inner SFT 12/96``, ``attribution
40/96`` (``replay``: one reverse step each), ``policy update 3/8``, and the same for the
validations (``validation: inner SFT 5/12``), including the one before the first step.

The module reports phases through :class:`PhaseReporter` (plain callables, so the core math
that reports per-step progress stays free of Lightning); this bar listens when it is active.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

#: ``(done, total)`` of the phase in progress.
StepProgress = Callable[[int, int], None]


class PhaseReporter:
    """Where the module reports its phases; a progress bar subscribes with :meth:`listen`."""

    def __init__(self) -> None:
        self._listener: Callable[[str], None] | None = None

    def listen(self, listener: Callable[[str], None] | None) -> None:
        self._listener = listener

    def phase(self, name: str, done: int = 0, total: int = 0) -> None:
        """Announce ``name`` (with ``done/total`` when the phase counts something)."""
        if self._listener is not None:
            self._listener(f"{name} {done}/{total}" if total else name)

    def steps(self, name: str) -> StepProgress:
        """A ``(done, total)`` callback for a counted phase (passed into the core math)."""
        return lambda done, total: self.phase(name, done, total)


class _Phases:
    """What both bars share: steps against ``max_steps``, the phase in the metrics, no
    ``v_num`` (mixed into Lightning's bar classes, before them)."""

    current_phase = ""

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps > 0 else float("inf")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        reporter = getattr(pl_module, "phases", None)
        if isinstance(reporter, PhaseReporter):
            reporter.listen(self._show)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        reporter = getattr(pl_module, "phases", None)
        if isinstance(reporter, PhaseReporter):
            reporter.listen(None)
        super().teardown(trainer, pl_module, stage)

    def _show(self, phase: str) -> None:
        self.current_phase = phase
        self._refresh_metrics()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.current_phase = ""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if self.current_phase:
            items["phase"] = self.current_phase
        return items


class PhaseTQDMProgressBar(_Phases, TQDMProgressBar):
    """Lightning's tqdm bar counting DPG steps, with the step's phase in its postfix."""

    def _refresh_metrics(self) -> None:
        bar = self._train_progress_bar
        if bar is not None and not bar.disable:
            bar.set_postfix(self.get_metrics(self.trainer, self.trainer.lightning_module))

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("DPG step")

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.current_phase = ""
        self.train_progress_bar.n = trainer.global_step
        self._refresh_metrics()


class PhaseRichProgressBar(_Phases, RichProgressBar):
    """Lightning's rich bar counting DPG steps, with the step's phase beside its metrics."""

    def _refresh_metrics(self) -> None:
        if self.is_enabled and self.trainer.lightning_module is not None:
            self._update_metrics(self.trainer, self.trainer.lightning_module)
            self.refresh()

    def _get_train_description(self, current_epoch: int) -> str:
        return "DPG step"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self.current_phase = ""
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


def phase_progress_bar(default: object) -> L.Callback | None:
    """The phase-showing replacement of Lightning's default bar ``default`` (``None`` when
    the trainer has none, or a bar of its own that is left alone)."""
    if type(default) is TQDMProgressBar:
        return PhaseTQDMProgressBar()
    if type(default) is RichProgressBar:
        return PhaseRichProgressBar()
    return None
