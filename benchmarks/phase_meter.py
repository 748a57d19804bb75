"""A callback that times each phase of a DPG step and records its peak memory.

It listens to the module's phase reports (``rollout``, ``inner SFT``, ``attribution``,
``policy update``: :class:`dpg_lightning.run.progress.PhaseReporter`), so it needs the progress bar
off (one listener). Peak memory per phase: on CUDA ``max_memory_allocated`` since the phase
began; on the CPU the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` when a phase begins), both minus the memory live when the meter was
set up (the interpreter and libraries, before any model is built), so the numbers compare with
the planner's, which counts tensors only.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from dpg_lightning.run.progress import PhaseReporter


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PhaseMeter(L.Callback):
    """Seconds and peak memory per phase of the training steps; written to ``output``.

    Args:
        output: JSON file for the rows ``{"phase", "seconds", "peak_bytes"}``.
    """

    def __init__(self, output: str) -> None:
        self.output = Path(output)
        self.rows: dict[str, dict[str, float]] = {}
        self.cuda = torch.cuda.is_available()
        # The rehearsal sets the baseline before any model is built; else: now.
        given = os.environ.get("PHASE_METER_BASELINE")
        now = torch.cuda.memory_allocated() if self.cuda else _status("VmRSS")
        self.baseline = int(given) if given else now
        self._phase: str | None = None
        self._start = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        reporter = getattr(pl_module, "phases", None)
        if isinstance(reporter, PhaseReporter):
            reporter.listen(self._on_phase)

    def _reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def _peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return _status("VmHWM") - self.baseline

    def _close(self) -> None:
        if self._phase is None:
            return
        row = self.rows.setdefault(self._phase, {"seconds": 0.0, "peak_bytes": 0})
        row["seconds"] += time.perf_counter() - self._start
        row["peak_bytes"] = max(row["peak_bytes"], self._peak())
        self._phase = None

    def _on_phase(self, text: str) -> None:
        phase = text.rstrip("0123456789/ ").strip()  # "inner SFT 3/8" -> "inner SFT"
        if phase == self._phase:
            return
        self._close()
        self._phase, self._start = phase, time.perf_counter()
        self._reset_peak()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._close()
        self.output.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"phase": k, **v} for k, v in self.rows.items()]
        self.output.write_text(json.dumps(rows, indent=1))
