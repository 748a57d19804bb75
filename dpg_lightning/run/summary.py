"""The end-of-run summary: did the run work, and where are its files.

A finished run should say, without digging through ``metrics.csv``, whether the generator got
better: validation Phi of the untrained generator (step 0), at the end and at its best, the
task's own readouts (every other ``val/...`` metric) and where checkpoints, metrics, samples and
plots were written. :class:`RunSummary` prints that at the end of fit and puts the same numbers
in the summary of every W&B run.

Steps are DPG steps, the loggers' steps, so the summary names the same rows as ``metrics.csv``
and the same numbers as checkpoint names: the module logs a step's metrics and the validation
after it at ``global_step`` (the DPG steps done, 1 for the first), and the untrained
generator's validation at step 0 itself (before any batch, outside Lightning's validation
loop); the module hands those metrics to :func:`record_validation`, which passes them on to
every callback that :class:`RecordsValidation`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

PREFIX = "val/"


@runtime_checkable
class RecordsValidation(Protocol):
    """A callback that keeps validation metrics by logger step."""

    def record(self, step: int, metrics: Mapping[str, Any]) -> None: ...


def record_validation(trainer: L.Trainer, step: int, metrics: Mapping[str, Any]) -> None:
    """Hand validation metrics the loggers got outside Lightning's validation loop (the step-0
    validation of the untrained generator) to every callback that records validations."""
    for callback in trainer.callbacks:
        if isinstance(callback, RecordsValidation):
            callback.record(step, metrics)


def logger_step(trainer: L.Trainer) -> int:
    """The step the loggers give the metrics of the validation running now (the ``step``
    column of ``metrics.csv``): the DPG steps done, ``trainer.global_step``, which the module
    logs as ``step`` (Lightning's own logger step, its count of batches that stepped, is one
    behind during a validation inside training).

    Under ``validate`` Lightning restores the weights but no loop state, so
    ``trainer.global_step`` reads 0 for any checkpoint; there the step is the validated
    checkpoint's, which the module keeps as ``checkpoint_step`` when it loads it (0 for the
    initial generator)."""
    if trainer.state.fn == TrainerFn.VALIDATING:
        return int(getattr(trainer.lightning_module, "checkpoint_step", None) or 0)
    return int(trainer.global_step)


def validation_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite scalar ``val/...`` metrics of ``metrics`` as floats."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not key.startswith(PREFIX):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue  # a non-scalar tensor or a string: not a number to summarize
        if math.isfinite(number):
            out[key] = number
    return out


def _fmt(value: float) -> str:
    return f"{value:.6g}"


class RunSummary(L.Callback):
    """Print whether the run worked and where its files are, at the end of fit (rank zero).

    It keeps every validation's ``val/...`` metrics by logger step (checkpointed, so a resumed
    run's summary covers the whole run) and the wall time of fit. W&B runs get the same numbers
    under ``summary/...`` keys.

    Args:
        monitor: the metric that says whether the run worked.
        mode: ``max`` if higher ``monitor`` is better, else ``min``.
    """

    def __init__(self, monitor: str = "val/phi", mode: Literal["max", "min"] = "max") -> None:
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.history: dict[int, dict[str, float]] = {}
        self._wall_before = 0.0  # fit time of the runs this one resumes
        self._started: float | None = None

    # ----------------------------------------------------------------- collecting

    def record(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Keep the ``val/...`` metrics of the validation logged at ``step`` (a redone step of a
        resumed run replaces the old values)."""
        values = validation_metrics(metrics)
        if values:
            self.history[int(step)] = values

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self.record(logger_step(trainer), trainer.callback_metrics)

    def wall_time(self) -> float:
        """Seconds spent in fit, over this process and the runs it resumed."""
        now = 0.0 if self._started is None else time.perf_counter() - self._started
        return self._wall_before + now

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {step: dict(values) for step, values in self.history.items()},
            "wall_time": self.wall_time(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {int(k): dict(v) for k, v in state_dict.get("history", {}).items()}
        self._wall_before = float(state_dict.get("wall_time", 0.0))

    # ----------------------------------------------------------------- reading out

    def numbers(self) -> dict[str, float]:
        """The summary's numbers, by the key they get in a W&B run summary."""
        out: dict[str, float] = {"summary/wall_time_s": self.wall_time()}
        series = self.series(self.monitor)
        name = self.monitor.removeprefix(PREFIX)
        if series:
            (first_step, first), (last_step, last) = series[0], series[-1]
            pick = max if self.mode == "max" else min
            best_step, best = pick(series, key=lambda point: point[1])
            out |= {
                f"summary/{name}_first": first, f"summary/{name}_first_step": first_step,
                f"summary/{name}_end": last, f"summary/{name}_end_step": last_step,
                f"summary/{name}_best": best, f"summary/{name}_best_step": best_step,
                f"summary/{name}_gain": last - first,
            }
        for key in self.readouts():
            (_, first), (_, last) = self.series(key)[0], self.series(key)[-1]
            short = key.removeprefix(PREFIX)
            out |= {f"summary/{short}_first": first, f"summary/{short}_end": last}
        return out

    def series(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of ``key`` over the validations, by step."""
        return [(step, m[key]) for step, m in sorted(self.history.items()) if key in m]

    def readouts(self) -> list[str]:
        """The validation metrics other than the monitored one, sorted."""
        keys = {key for values in self.history.values() for key in values}
        return sorted(keys - {self.monitor})

    def lines(self, trainer: L.Trainer, log_dir: str | None) -> list[str]:
        """The printed summary."""
        out = ["", "=== run summary ==="]
        series = self.series(self.monitor)
        if series:
            (first_step, first), (last_step, last) = series[0], series[-1]
            pick = max if self.mode == "max" else min
            best_step, best = pick(series, key=lambda point: point[1])
            gain = last - first
            share = f" ({100 * gain / abs(first):+.3g}%)" if first else ""
            better = "higher" if self.mode == "max" else "lower"
            out += [
                f"{self.monitor} ({better} is better):",
                f"  step {first_step}: {_fmt(first)}",
                f"  end (step {last_step}): {_fmt(last)}  change {gain:+.6g}{share}",
                f"  best (step {best_step}): {_fmt(best)}"
                + ("  (the untrained generator: no step beat it)" if best_step == 0 else ""),
            ]
        else:
            out.append(f"{self.monitor}: no validation ran")
        readouts = self.readouts()
        if readouts:
            out.append("readouts (first -> end):")
            for key in readouts:
                (s0, v0), (s1, v1) = self.series(key)[0], self.series(key)[-1]
                out.append(f"  {key}: {_fmt(v0)} (step {s0}) -> {_fmt(v1)} (step {s1})")
        out.append(f"wall time: {self.wall_time():.1f} s")
        out += _artefacts(trainer, log_dir)
        return out

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.is_global_zero:
            self.report(trainer, log_dir)

    def report(self, trainer: L.Trainer, log_dir: str | None) -> None:
        """Print the summary and write its numbers into every W&B run's summary."""
        print("\n".join(self.lines(trainer, log_dir)), flush=True)
        numbers = self.numbers()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for key, value in numbers.items():
                    logger.experiment.summary[key] = value


def _artefacts(trainer: L.Trainer, log_dir: str | None) -> list[str]:
    """Where the run's files are: only those that exist."""
    out = []
    if log_dir and Path(log_dir).exists():
        out.append(f"run directory: {log_dir}")
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.dirpath and Path(ckpt.dirpath).is_dir():
        best = ckpt.best_model_path if Path(ckpt.best_model_path or "").is_file() else "-"
        out.append(f"checkpoints: {ckpt.dirpath} (best: {best})")
    for callback in trainer.callbacks:
        path = getattr(callback, "output_path", None)
        if path and Path(path).exists():
            out.append(f"{type(callback).__name__}: {path}")
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / "metrics.csv"
            if path.is_file():
                out.append(f"metrics.csv: {path}")
                continue
        where = logger.log_dir or logger.save_dir
        if where and Path(where).exists():
            out.append(f"{type(logger).__name__}: {where}")
    return out
