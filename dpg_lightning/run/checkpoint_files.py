"""Checkpoint files: written so that a kill never leaves a broken one, and found by readability.

A kill or a full disk during a save must not cost the previous checkpoint, and ``--ckpt_path
last`` and ``sample`` must not trip over the broken file such an event can still leave (a copy
made by hand, another writer): :class:`AtomicCheckpointIO` writes, :func:`unreadable` checks
cheaply, :func:`newest_readable_checkpoint` picks what a resume continues.
"""

from __future__ import annotations

import glob
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written so that a kill or a full disk never leaves a broken file in place.

    The checkpoint goes to a temporary file *in the destination directory* (a rename within
    one filesystem is atomic; Lightning's own save stages through a temporary file that may
    live on another filesystem, and a kill during the final copy leaves a 0-byte or truncated
    ``last.ckpt``), is flushed and fsync'ed, and only then renamed over the old file, whose
    directory entry is fsync'ed too. Until the rename the previous checkpoint is untouched; a
    write that fails removes its temporary file and says which checkpoint was kept. Remote
    paths (``s3://``...) keep Lightning's behaviour.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            # A full disk or a file-size limit surfaces as an OSError or, from torch's zip
            # writer, as a RuntimeError: both leave the previous checkpoint as it was.
            if isinstance(err, (OSError, RuntimeError)):
                kept = "the previous one is kept" if path.exists() else "no earlier one exists"
                raise OSError(
                    f"writing checkpoint {path} failed ({err}); {kept}. Free space on that "
                    "filesystem or point the checkpoints elsewhere"
                ) from err
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
