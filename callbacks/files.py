"""Where observing callbacks write, and how their files survive a resume.

A run keeps one directory across interruptions (``dpg_lightning.run.run_dir``), so a resumed run
appends to the files of the attempts before it. Rows an attempt wrote after its last checkpoint
belong to steps that the resume redoes: :func:`drop_rows_from` removes them first, so each step
appears once. Under ``fast_dev_run`` Lightning writes no logs or checkpoints, and neither do
these callbacks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L


def run_dir(trainer: L.Trainer) -> Path:
    """The run's output directory: ``trainer.log_dir`` (the first logger's), else the root dir.

    A collective under DDP: every rank must ask.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


def writes_files(trainer: L.Trainer, stage: str) -> bool:
    """Whether an observing callback writes files on this rank: rank zero of a real fit."""
    return stage == "fit" and trainer.is_global_zero and not trainer.fast_dev_run


def drop_rows_from(path: Path, step: int) -> int:
    """Remove the JSONL rows of ``path`` whose ``step`` is ``>= step``; returns how many.

    The file is rewritten atomically (a kill leaves the old or the new file, never half).
    """
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) < step]
    if len(kept) == len([line for line in lines if line.strip()]):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)
