"""Progress that shows where a DPG step is, not an epoch count: a bar in a terminal, lines in a log.

At paper scale one DPG step takes minutes, so Lightning's bar (``Epoch 0/-2``, ``v_num``) says
nothing for a long time. In a terminal, the bar here counts steps against ``trainer.max_steps``
and shows the step's current phase with its own progress: ``rollout``, ``inner SFT 12/96``,
``attribution 40/96`` (``replay``: one reverse step each), ``policy update 3/8``, and the same
for the validations (``validation: inner SFT 5/12``), including the one before the first step.

Outside a terminal (a Slurm ``.out``, ``tee``, a file) a bar is one line rewritten with carriage
returns, which a log shows only at the end; there :class:`PhaseLines` prints a short, parseable
line per DPG step instead (at most one every ``every_s`` seconds when steps are fast; the last
step always), a line per validation, and phase lines within steps longer than
``phase_every_s``::

    [dpg] step 3/20 | rollout 0.4s sft 1.1s attr 0.3s update 0.2s | reward mean 1.2e-05 std 3e-06
          | phi -25.81 | val/phi -25.82 (step 0) | eta 0:00:34            (one line in the log)
    [dpg] step 4/20 | inner SFT 12/96 | 0:01:05 so far
    [dpg] validation at step 10 | val/phi -25.79

The module reports phases through :class:`PhaseReporter` (plain callables, so the core math
that reports per-step progress stays free of Lightning); the bar or the lines listen.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from dpg_lightning.run.summary import logger_step


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


#: ``time/*`` metrics of a step, in the order of the step, with their short names.
PHASE_TIMES = {"rollout": "rollout", "inner_sft": "sft", "attribution": "attr",
               "policy_update": "update"}


def _number(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def _seconds(t: float) -> str:
    """``1.1s``, or ``0.04s`` below a second (tiny runs' phases would all read ``0.0s``)."""
    return f"{t:.1f}s" if t >= 1 else f"{t:.2f}s"


def _time_entry(name: str, value: float) -> str:
    """Another ``time/...`` metric: seconds, or a rate where its name says one
    (``examples_per_second`` from ``callbacks.RolloutMetrics``: ``examples/s 115``)."""
    if name.endswith("_per_second"):
        return f"{name.removesuffix('_per_second')}/s {value:.3g}"
    return f"{name} {_seconds(value)}"


def step_line(step: int, max_steps: int, metrics: dict[str, Any], val: tuple[float, int] | None,
              eta_s: float | None) -> str:
    """One step's log line from ``trainer.callback_metrics`` (what the module logged)."""
    total = str(max_steps) if max_steps > 0 else "?"
    parts = [f"[dpg] step {step}/{total}"]
    times = [f"{short} {_seconds(t)}" for key, short in PHASE_TIMES.items()
             if (t := _number(metrics, f"time/{key}")) is not None]
    times += [_time_entry(key[5:], float(v)) for key, v in metrics.items()
              if key.startswith("time/") and key[5:] not in PHASE_TIMES]
    if times:
        parts.append(" ".join(times))
    mean, std = _number(metrics, "train/reward_mean"), _number(metrics, "train/reward_std")
    if mean is not None:
        parts.append(f"reward mean {mean:.3g}" + (f" std {std:.3g}" if std is not None else ""))
    phi = _number(metrics, "train/phi_after_sft")
    if phi is not None:
        parts.append(f"phi {phi:.4g}")
    if val is not None:
        parts.append(f"val/phi {val[0]:.4g} (step {val[1]})")
    if eta_s is not None:
        parts.append(f"eta {timedelta(seconds=round(eta_s))}")
    return " | ".join(parts)


class PhaseLines(_Phases):
    """Progress as log lines, for output that is not a terminal (see the module doc).

    Mixed into Lightning's bar classes with their bars off (``refresh_rate=0``): a callback
    returned by ``configure_callbacks`` replaces the trainer's default bar only when it is of
    that bar's class. It prints on rank 0 only, to stdout, flushed.

    Args:
        every_s: the least time between two step lines (the last step is always printed).
        phase_every_s: within a step that runs longer, a line on the phase in progress at most
            this often.
    """

    def __init__(self, every_s: float = 5.0, phase_every_s: float = 30.0) -> None:
        super().__init__(refresh_rate=0)
        self.every_s, self.phase_every_s = every_s, phase_every_s
        self._last_line = float("-inf")  # time.monotonic() of the last line printed
        self._step_start: float | None = None  # when the step (or validation) in progress began
        self._first_start: float | None = None  # when this process's first step began
        self._first_step = 0  # the global step the timing started at (a resumed run's)
        self._val: tuple[float, int] | None = None

    def _print(self, line: str) -> None:
        if self._trainer is None or self.trainer.is_global_zero:
            print(line, file=sys.stdout, flush=True)
        self._last_line = time.monotonic()

    def _show(self, phase: str) -> None:
        self.current_phase = phase
        now = time.monotonic()
        start = self._step_start
        if start is None or self._trainer is None:
            return
        if now - start >= self.phase_every_s and now - self._last_line >= self.phase_every_s:
            trainer = self.trainer
            where = f"step {trainer.global_step + 1}/{trainer.max_steps}"
            if trainer.validating or phase.startswith("validation"):
                where = f"validation at step {logger_step(trainer)}"
            self._print(f"[dpg] {where} | {phase} | {timedelta(seconds=round(now - start))} "
                        "so far")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._step_start = time.monotonic()  # the module's validation before the first step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_start = time.monotonic()
        if self._first_start is None:
            self._first_start, self._first_step = self._step_start, trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.current_phase = ""
        step, now = trainer.global_step, time.monotonic()
        last = trainer.max_steps > 0 and step >= trainer.max_steps
        if not last and now - self._last_line < self.every_s:
            return
        eta = None
        done = step - self._first_step
        if trainer.max_steps > 0 and done > 0 and self._first_start is not None:
            eta = (now - self._first_start) / done * (trainer.max_steps - step)
        self._print(step_line(step, trainer.max_steps, trainer.callback_metrics, self._val, eta))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        if not trainer.sanity_checking:
            self._step_start = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        phi = _number(trainer.callback_metrics, "val/phi")
        if phi is None or trainer.sanity_checking:
            return
        step = logger_step(trainer)
        self._val = (phi, step)
        self._print(f"[dpg] validation at step {step} | val/phi {phi:.4g}")


class TQDMPhaseLines(PhaseLines, TQDMProgressBar):
    """:class:`PhaseLines` in place of Lightning's tqdm bar."""


class RichPhaseLines(PhaseLines, RichProgressBar):
    """:class:`PhaseLines` in place of Lightning's rich bar (its default where rich exists)."""


def phase_progress_bar(default: object, terminal: bool | None = None) -> L.Callback | None:
    """The phase-showing replacement of Lightning's default bar ``default`` (``None`` when
    the trainer has none, or a bar of its own that is left alone): a bar in a terminal,
    :class:`PhaseLines` when stdout is not one (``terminal``: whether it is; default: ask)."""
    terminal = sys.stdout.isatty() if terminal is None else terminal
    if type(default) is TQDMProgressBar:
        return PhaseTQDMProgressBar() if terminal else TQDMPhaseLines()
    if type(default) is RichProgressBar:
        return PhaseRichProgressBar() if terminal else RichPhaseLines()
    return None
