"""One run = one directory, whatever the interruptions: resolving it and ``--ckpt_path last``.

A run's directory is its first logger's version directory (``<save_dir>/<name>/version_N``):
metrics, samples, plots and (by default) its checkpoints live there. Left alone, Lightning
gives a resumed run a new ``version_N+1`` (so the curve is split in two and ``--ckpt_path
last`` finds nothing in the new, empty directory) and its CSV logger deletes an existing
``metrics.csv``. Before anything is built, :func:`resolve_run` therefore

* turns ``--ckpt_path last`` into the newest *readable* checkpoint of the run (in its
  checkpoint directories, and Slurm's ``hpc_ckpt_*.ckpt`` in the root dir), saying which
  broken files it skipped, or into a fresh start when there is none;
* pins every logger to the version directory the checkpoint belongs to, and swaps
  Lightning's ``CSVLogger`` for
  :class:`~dpg_lightning.run.csv_logger.RunCSVLogger`, which appends to ``metrics.csv``
  (dropping the rows of steps the checkpoint does not hold: they are about to be redone);
* gives a resumed W&B logger the run id stored in that directory (``wandb_run_id``), so the
  W&B run continues too (:mod:`dpg_lightning.run.wandb_run`);
* refuses a fresh run into a fixed version directory that already holds results.

``validate`` reads a run and never writes into it (:func:`_validation_dir`): its metrics,
``hparams.yaml`` and the ``config.yaml`` LightningCLI saves go to a directory of its own,
``<run dir>/validate/step<N>`` (N: the checkpoint's step; ``step<N>_2``... when validated
again), its CSV row carries the checkpoint's step so it lines up with the training curve, and a
W&B logger starts a run of its own instead of continuing the training run.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.run.checkpoint_files import (
    checkpoint_step,
    newest_readable_checkpoint,
    unreadable,
)
from dpg_lightning.run.wandb_run import stored_wandb_id

CSV_CLASSES = {"CSVLogger", "lightning.pytorch.loggers.CSVLogger",
               "lightning.pytorch.loggers.csv_logs.CSVLogger",
               "pytorch_lightning.loggers.CSVLogger"}
RUN_CSV = "dpg_lightning.run.csv_logger.RunCSVLogger"


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
class ResolvedRun:
    """What :func:`resolve_run` decided: the checkpoint to resume and its step, if any."""

    ckpt_path: str | None = None
    step: int | None = None
    notes: list[str] = field(default_factory=list)


def resolve_run(config: Any, command: str | None = None) -> ResolvedRun:
    """Resolve ``ckpt_path`` and pin the loggers to the run's directory (see module doc).

    ``config`` is one subcommand's parsed namespace; it is edited in place. ``command`` is
    the subcommand (``fit`` or ``validate``: a directory of its own, :func:`_validation_dir`);
    ``None`` tells them apart by ``verbose``, an argument of ``Trainer.validate`` only.
    """
    if command is None:
        command = "validate" if "verbose" in config else "fit"
    validating = command == "validate"
    trainer = config.get("trainer")
    loggers = _loggers(trainer)
    first = loggers[0] if loggers else None
    run = ResolvedRun(config.get("ckpt_path"))
    if run.ckpt_path == "last":
        path, skipped = newest_readable_checkpoint(_checkpoint_dirs(config, first))
        run.notes += [f"skipped an unreadable checkpoint: {s}" for s in skipped]
        if path is None and validating:
            raise ConfigError(
                "`validate --ckpt_path last`: this run has no readable checkpoint yet in "
                + ", ".join(str(d) for d in _checkpoint_dirs(config, first))
            )
        if path is None:
            run.notes.append("`--ckpt_path last`: no checkpoint of this run yet, starting it")
            run.ckpt_path = None
        else:
            run.ckpt_path = str(path)
        config["ckpt_path"] = run.ckpt_path
    elif run.ckpt_path and Path(run.ckpt_path).is_file():
        why = unreadable(run.ckpt_path)
        if why is not None:
            raise ConfigError(
                f"`--ckpt_path {run.ckpt_path}` cannot be resumed: {why}. `--ckpt_path last` "
                "resumes the newest readable checkpoint of the run"
            )
    if run.ckpt_path and Path(run.ckpt_path).is_file():
        run.step = checkpoint_step(run.ckpt_path)
        if not validating:
            run.notes.append(f"resuming {run.ckpt_path} at step {run.step}")
    version = run_dir = None
    if (run.step is not None or validating) and first is not None:
        # The version directory the checkpoint lies in; for one outside them (Slurm's
        # hpc_ckpt_N.ckpt in the root dir) the configured or else the newest one.
        # (validate: never the newest of unrelated versions; its own directory goes to the
        # root dir instead, see _validation_dir).
        existing = sorted(first.version_dirs(), key=lambda d: d.stat().st_mtime)
        ckpt = Path(run.ckpt_path) if run.step is not None else None
        version = ((ckpt and _version_of(ckpt, first)) or _fixed_version(first)
                   or (existing[-1].name if existing and not validating else None))
        root = first.root()
        run_dir = root / version if root is not None and version else None
    if validating:
        _validation_dir(config, loggers, run_dir, run)
        return run
    for logger in loggers:
        _pin(logger, version, run_dir, run)
    return run


def _fixed_version(logger: LoggerSpec) -> str | None:
    if logger.version is None:
        return None
    return logger.version if isinstance(logger.version, str) else f"version_{logger.version}"


def _pin(logger: LoggerSpec, version: str | None, run_dir: Path | None, run: ResolvedRun) -> None:
    """Point one logger at the run's directory (resume) or check it is free (fresh run)."""
    args = logger.node.get("init_args")
    short = logger.class_path.rsplit(".", 1)[-1]
    if logger.class_path in CSV_CLASSES:
        logger.node["class_path"] = RUN_CSV
    if short in ("CSVLogger", "RunCSVLogger", "TensorBoardLogger") and args is not None:
        if version is not None:
            args["version"] = version
            if logger.node["class_path"] == RUN_CSV:
                args["resume_step"] = run.step
        elif run.step is None and logger.version is not None:
            fixed = logger.version_dirs()
            if fixed and any(fixed[0].iterdir()):
                raise ConfigError(
                    f"`trainer.logger` writes to {fixed[0]}, which holds an earlier run's results; "
                    "resume that run with `--ckpt_path last`, or give this run another "
                    "`version` (or none: a new version_N), or move the old directory away"
                )
    if short == "WandbLogger" and args is not None and run.step is not None:
        run_dir = run_dir or Path(run.ckpt_path).parent
        stored = stored_wandb_id(run_dir)
        if not args.get("id") and stored is not None:
            args["id"] = stored
            args["resume"] = "allow"


#: Where ``validate`` writes, under the run directory it reads.
VALIDATE_DIR = "validate"


def _free_dir(parent: Path, name: str) -> Path:
    """``parent/name``, or ``name_2``, ``name_3``... when it already holds something: a second
    validation of a checkpoint (other prompts, another seed) keeps the first one's results."""
    path, n = parent / name, 1
    while path.exists() and (not path.is_dir() or any(path.iterdir())):
        n += 1
        path = parent / f"{name}_{n}"
    return path


def _validation_dir(
    config: Any, loggers: list[LoggerSpec], run_dir: Path | None, run: ResolvedRun
) -> Path:
    """Send everything ``validate`` writes to ``<run dir>/validate/step<N>`` (module doc).

    Why its own directory and not the run's: a validation is not a training step, so a row
    in the run's ``metrics.csv`` would put a step-0 point carrying the trained generator's
    value on the training curve, and LightningCLI's ``config.yaml`` (saved to
    ``trainer.log_dir``) would replace the config the run was trained with. Why inside the
    run directory and not a sibling ``version_N``: it belongs to that run, and a resumed run
    (``--ckpt_path last`` with Slurm's checkpoints) takes the newest ``version_N`` as the run.
    Without a version directory (no local logger, a checkpoint from elsewhere) the base is
    ``trainer.default_root_dir``. Each logger keeps its class; only where it writes changes.
    Under DDP a rank started after rank 0 made the directory may pick the next free name;
    harmless: only rank 0 writes, and Lightning broadcasts rank 0's ``trainer.log_dir``.
    """
    trainer = config.get("trainer")
    base = run_dir if run_dir is not None and run_dir.is_dir() else None
    if base is None:
        base = Path((trainer.get("default_root_dir") if trainer else None) or os.getcwd())
    out = _free_dir(base / VALIDATE_DIR, f"step{run.step or 0}")
    if trainer is not None:
        # Where callbacks and a config save fall back to when no logger names a directory.
        trainer["default_root_dir"] = str(out)
    for logger in loggers:
        args = logger.node.get("init_args")
        short = logger.class_path.rsplit(".", 1)[-1]
        if args is None:
            continue
        if logger.class_path in CSV_CLASSES or short == "RunCSVLogger":
            logger.node["class_path"] = RUN_CSV
            args["at_step"] = run.step
            args.pop("resume_step", None)
        if short in ("CSVLogger", "RunCSVLogger", "TensorBoardLogger"):
            args["save_dir"], args["name"], args["version"] = str(base), VALIDATE_DIR, out.name
        elif short == "WandbLogger":
            # A W&B run of its own: the training run's id would append this validation to
            # the training curves (an id the config names is dropped; the one stored in the
            # run directory is not read).
            args["save_dir"] = str(out)
            for key in ("id", "version"):
                if args.get(key):
                    args[key] = None
    what = (f"checkpoint {run.ckpt_path} (step {run.step})" if run.step is not None
            else "the initial generator (no --ckpt_path)")
    run.notes.append(f"validating {what}: metrics and config go to {out}")
    return out


def report(run: ResolvedRun) -> None:
    """Say what was resolved (rank 0 only: every rank resolves the same)."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("SLURM_PROCID", "0") != "0":
        return
    for note in run.notes:
        print(f"[dpg] {note}", file=sys.stderr, flush=True)
