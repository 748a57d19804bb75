"""A CSV logger that continues a resumed run's ``metrics.csv`` instead of deleting it.

Lightning's ``CSVLogger`` removes an existing ``metrics.csv`` when it starts, so a resumed run
would lose its curve up to the checkpoint; and the rows an interrupted attempt wrote after its
last checkpoint are about to be logged again. The CLI swaps Lightning's logger for this one
(:mod:`dpg_lightning.run.run_dir`).
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` is continued, not deleted:
    its header is kept, and rows of steps ``> resume_step`` (logged by an attempt after its
    last checkpoint, about to be redone) are dropped first. Steps count DPG steps done, so
    the checkpoint's own step ``resume_step`` was finished before it and its row stays."""

    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            rows, keys = list(reader), list(reader.fieldnames or [])
        self.metrics_keys = keys
        if self.resume_step is None:
            return
        kept = [r for r in rows if not r.get("step") or int(float(r["step"])) <= self.resume_step]
        if len(kept) == len(rows):
            return
        tmp = self.metrics_file_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics_file_path)


class RunCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` that continues a resumed run's ``metrics.csv`` in place.

    The CLI uses it wherever a config names Lightning's ``CSVLogger`` (same arguments). It
    writes the file every step by default (Lightning: every 100): a DPG step takes seconds
    to minutes, so this costs nothing, and a killed run keeps the rows of its steps.

    Args:
        resume_step: the step the run resumes from (set by the CLI): rows of later steps,
            left by the interrupted attempt, are dropped; ``None`` keeps every row.
        at_step: log every row at this step instead of the trainer's (set by the CLI for
            ``validate``: the checkpoint's step; Lightning's ``validate`` counts from 0, which
            would put a trained generator's value at step 0).
    """

    def __init__(
        self,
        save_dir: str,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 1,
        resume_step: int | None = None,
        at_step: int | None = None,
    ) -> None:
        super().__init__(save_dir, name, version, prefix, flush_logs_every_n_steps)
        self.resume_step = resume_step
        self.at_step = at_step

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, step if self.at_step is None else self.at_step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self.resume_step)
        return self._experiment
