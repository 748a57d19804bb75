"""Checkpoints of a DPG run: written atomically, and checked to belong to the configured model.

Resuming a checkpoint of another model either fails deep in ``load_state_dict`` with a wall of
shape mismatches or, with equal shapes, silently becomes another experiment; the checks here
turn both into one message that names what differs.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from dpg_lightning.common.errors import ConfigError


def plain(value: Any) -> Any:
    """Hyper-parameters as plain values: dataclasses to dicts, tuples to lists, recursively
    (checkpoints pickle the config dataclasses; a parsed config holds dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# Model hyper-parameters that make a checkpoint another run: resuming across them is an error.
IDENTITY_KEYS = ("generator", "target", "reward", "distributed")


def check_checkpoint_config(current: dict[str, Any], saved: dict[str, Any]) -> None:
    """Error on a checkpoint of a different model; warn about other changed hyper-parameters.

    Why an error: a checkpoint of another architecture otherwise fails deep in
    ``load_state_dict`` with a wall of shape mismatches, and one of the same shapes but another
    reward/target/sharing would silently become a different experiment. ``LightningCLI``
    rebuilds the model from the checkpoint's hyper-parameters, replacing the config's, so the
    CLI calls this before that happens (``DPGCLI``); ``on_load_checkpoint`` covers the rest.
    """
    differ = sorted(k for k in set(current) | set(saved)
                    if k in current and k in saved and current[k] != saved[k])
    fatal = [k for k in differ if k in IDENTITY_KEYS]
    if fatal:
        lines = "\n".join(_diff_lines(f"model.{k}", saved[k], current[k]) for k in fatal)
        raise ConfigError(
            "the checkpoint was trained with a different model configuration, so it cannot be "
            f"resumed with this config:\n{lines}\nresume with the config the checkpoint was "
            "trained with (config.yaml in its run directory) or start a fresh run"
        )
    if differ:
        warnings.warn(
            f"resuming with changed model settings {differ}: the checkpoint's values are used "
            "(LightningCLI restores a model from its checkpoint's hyper-parameters)",
            stacklevel=2,
        )


def _diff_lines(key: str, saved: Any, current: Any) -> str:
    """``key: checkpoint X, config Y`` for each differing leaf (nested dicts are walked)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        return "\n".join(_diff_lines(f"{key}.{k}", saved.get(k), current.get(k)) for k in keys)
    return f"  {key}: checkpoint {saved!r}, config {current!r}"


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
