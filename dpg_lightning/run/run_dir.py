"""One run = one directory, whatever the interruptions.

A run's directory is its first logger's version directory (``<save_dir>/<name>/version_N``):
metrics, samples, plots and (by default) its checkpoints live there. Left alone, Lightning
gives a resumed run a new ``version_N+1`` (so the curve is split in two and ``--ckpt_path
last`` finds nothing in the new, empty directory) and its CSV logger deletes an existing
``metrics.csv``. Before anything is built, :func:`resolve_run` therefore

* turns ``--ckpt_path last`` into the newest *readable* checkpoint of the run (in its
  checkpoint directories, and Slurm's ``hpc_ckpt_*.ckpt`` in the root dir), saying which
  broken files it skipped, or into a fresh start when there is none;
* pins every logger to the version directory the checkpoint belongs to, and swaps
  Lightning's ``CSVLogger`` for :class:`RunCSVLogger`, which appends to ``metrics.csv``
  (dropping the rows of steps the checkpoint does not hold: they are about to be redone);
* gives a resumed W&B logger the run id stored in that directory (``wandb_run_id``), so the
  W&B run continues too;
* refuses a fresh run into a fixed version directory that already holds results.
"""

from __future__ import annotations

import csv
import glob
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from dpg_lightning.common.errors import ConfigError

CSV_CLASSES = {"CSVLogger", "lightning.pytorch.loggers.CSVLogger",
               "lightning.pytorch.loggers.csv_logs.CSVLogger",
               "pytorch_lightning.loggers.CSVLogger"}
RUN_CSV = "dpg_lightning.run.run_dir.RunCSVLogger"
WANDB_ID_FILE = "wandb_run_id"


def unreadable(path: str | Path) -> str | None:
    """Why ``path`` cannot be a checkpoint (empty, truncated, not a torch zip), else None.

    Reads only the zip directory at the end of the file and compares the members' extents
    with the file's size: cheap even for checkpoints of many GB, and it catches the files
    that a kill or a full disk leaves behind.
    """
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "it is empty (0 bytes)"
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    return "it is truncated"
    except (OSError, zipfile.BadZipFile) as err:
        return f"it is not a complete checkpoint ({err})"
    return None


def checkpoint_step(path: str | Path) -> int:
    """The ``global_step`` a Lightning checkpoint holds (tensors are memory-mapped, not read)."""
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(state.get("global_step", 0))


@dataclass
class LoggerSpec:
    """One configured logger: where in the config it is and where it writes."""

    node: Any  # the logger's namespace (class_path, init_args), edited in place
    class_path: str
    save_dir: str | None
    name: str | None
    version: int | str | None

    def root(self) -> Path | None:
        """``<save_dir>/<name>``: the directory holding its version directories."""
        if self.save_dir is None:
            return None
        return Path(self.save_dir) / self.name if self.name else Path(self.save_dir)

    def version_dirs(self) -> list[Path]:
        root = self.root()
        if root is None:
            return []
        if self.version is not None:
            fixed = root / (self.version if isinstance(self.version, str)
                            else f"version_{self.version}")
            return [fixed] if fixed.is_dir() else []
        return sorted(p for p in root.glob("version_*") if p.is_dir())


def _loggers(trainer: Any) -> list[LoggerSpec]:
    nodes = trainer.get("logger") if trainer is not None else None
    if nodes is None or isinstance(nodes, bool):
        return []
    nodes = nodes if isinstance(nodes, list) else [nodes]
    specs = []
    for node in nodes:
        if not hasattr(node, "get") or not node.get("class_path"):
            continue
        args = node.get("init_args") or {}
        name = args.get("name", "lightning_logs")
        if node["class_path"].rsplit(".", 1)[-1] == "WandbLogger":
            name = None
        specs.append(LoggerSpec(node, node["class_path"], args.get("save_dir"), name,
                                args.get("version")))
    return specs


# Callbacks whose ``dirpath`` holds this run's checkpoints (by the class path's last name).
CHECKPOINT_CLASSES = ("ModelCheckpoint", "LastCheckpoint")


def _checkpoint_dirs(config: Any, logger: LoggerSpec | None) -> list[Path]:
    """Where this run's checkpoints can be: every ModelCheckpoint ``dirpath`` of the config,
    ``checkpoints/`` of the first logger's version directories, and the root dir."""
    trainer = config.get("trainer") or {}
    dirs = []
    for node in trainer.get("callbacks") or []:
        if hasattr(node, "get") and str(node.get("class_path", "")).endswith(CHECKPOINT_CLASSES):
            dirpath = (node.get("init_args") or {}).get("dirpath")
            if dirpath:
                dirs.append(Path(dirpath))
    if logger is not None:
        dirs += [d / "checkpoints" for d in logger.version_dirs()]
    dirs.append(Path(trainer.get("default_root_dir") or os.getcwd()))
    return dirs


def newest_readable_checkpoint(dirs: list[Path]) -> tuple[Path | None, list[str]]:
    """The newest readable checkpoint in ``dirs`` (``last*.ckpt``, ``hpc_ckpt_*.ckpt`` and the
    kept top-k files: any of them resumes the run), and a line for each newer broken one."""
    found: set[Path] = set()
    for d in dirs:
        found.update(Path(p) for p in glob.glob(str(d / "*.ckpt")))
    skipped = []
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        why = unreadable(path)
        if why is None:
            return path, skipped
        skipped.append(f"{path}: {why}")
    return None, skipped


def _version_of(path: Path, logger: LoggerSpec) -> str | None:
    """The version directory name of ``logger`` that ``path`` lies in, if any."""
    root = logger.root()
    if root is None:
        return None
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return rel.parts[0] if len(rel.parts) > 1 else None


@dataclass
class RunPlan:
    """What :func:`resolve_run` decided: the checkpoint to resume and its step, if any."""

    ckpt_path: str | None = None
    step: int | None = None
    notes: list[str] = field(default_factory=list)


def resolve_run(config: Any) -> RunPlan:
    """Resolve ``ckpt_path`` and pin the loggers to the run's directory (see module doc).

    ``config`` is one subcommand's parsed namespace; it is edited in place.
    """
    trainer = config.get("trainer")
    loggers = _loggers(trainer)
    first = loggers[0] if loggers else None
    plan = RunPlan(config.get("ckpt_path"))
    if plan.ckpt_path == "last":
        path, skipped = newest_readable_checkpoint(_checkpoint_dirs(config, first))
        plan.notes += [f"skipped an unreadable checkpoint: {s}" for s in skipped]
        if path is None:
            plan.notes.append("`--ckpt_path last`: no checkpoint of this run yet, starting it")
            plan.ckpt_path = None
        else:
            plan.ckpt_path = str(path)
        config["ckpt_path"] = plan.ckpt_path
    elif plan.ckpt_path and Path(plan.ckpt_path).is_file():
        why = unreadable(plan.ckpt_path)
        if why is not None:
            raise ConfigError(
                f"`--ckpt_path {plan.ckpt_path}` cannot be resumed: {why}. `--ckpt_path last` "
                "resumes the newest readable checkpoint of the run"
            )
    if plan.ckpt_path and Path(plan.ckpt_path).is_file():
        plan.step = checkpoint_step(plan.ckpt_path)
        plan.notes.append(f"resuming {plan.ckpt_path} at step {plan.step}")
    version = run_dir = None
    if plan.step is not None and first is not None:
        # The version directory the checkpoint lies in; for one outside them (Slurm's
        # hpc_ckpt_N.ckpt in the root dir) the configured or else the newest one.
        existing = sorted(first.version_dirs(), key=lambda d: d.stat().st_mtime)
        version = (_version_of(Path(plan.ckpt_path), first) or _fixed_version(first)
                   or (existing[-1].name if existing else None))
        root = first.root()
        run_dir = root / version if root is not None and version else None
    for logger in loggers:
        _pin(logger, version, run_dir, plan)
    return plan


def _fixed_version(logger: LoggerSpec) -> str | None:
    if logger.version is None:
        return None
    return logger.version if isinstance(logger.version, str) else f"version_{logger.version}"


def _pin(logger: LoggerSpec, version: str | None, run_dir: Path | None, plan: RunPlan) -> None:
    """Point one logger at the run's directory (resume) or check it is free (fresh run)."""
    args = logger.node.get("init_args")
    short = logger.class_path.rsplit(".", 1)[-1]
    if logger.class_path in CSV_CLASSES:
        logger.node["class_path"] = RUN_CSV
    if short in ("CSVLogger", "RunCSVLogger", "TensorBoardLogger") and args is not None:
        if version is not None:
            args["version"] = version
            if logger.node["class_path"] == RUN_CSV:
                args["resume_step"] = plan.step
        elif plan.step is None and logger.version is not None:
            fixed = logger.version_dirs()
            if fixed and any(fixed[0].iterdir()):
                raise ConfigError(
                    f"`trainer.logger` writes to {fixed[0]}, which holds an earlier run's results; "
                    "resume that run with `--ckpt_path last`, or give this run another "
                    "`version` (or none: a new version_N), or move the old directory away"
                )
    if short == "WandbLogger" and args is not None and plan.step is not None:
        run_dir = run_dir or Path(plan.ckpt_path).parent
        stored = run_dir / WANDB_ID_FILE
        if not args.get("id") and not os.environ.get("WANDB_RUN_ID") and stored.is_file():
            args["id"] = stored.read_text().strip()
            args["resume"] = "allow"


def report(plan: RunPlan) -> None:
    """Say what was resolved (rank 0 only: every rank resolves the same)."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("SLURM_PROCID", "0") != "0":
        return
    for note in plan.notes:
        print(f"[dpg] {note}", file=sys.stderr, flush=True)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` is continued, not deleted:
    its header is kept, and rows of steps ``>= resume_step`` (logged by an attempt after its
    last checkpoint, about to be redone) are dropped first."""

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
        kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < self.resume_step]
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
        resume_step: the step the run resumes from (set by the CLI): rows of this step and
            later, left by the interrupted attempt, are dropped; ``None`` keeps every row.
    """

    def __init__(
        self,
        save_dir: str,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 1,
        resume_step: int | None = None,
    ) -> None:
        super().__init__(save_dir, name, version, prefix, flush_logs_every_n_steps)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self.resume_step)
        return self._experiment


class RememberWandbRun(L.Callback):
    """Write each W&B logger's run id to ``<run dir>/wandb_run_id``, where a resume finds it."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        wandb = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if stage != "fit" or not wandb:
            return
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: all ranks
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / WANDB_ID_FILE).write_text(wandb[0].experiment.id + "\n")
