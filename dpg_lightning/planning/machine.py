"""The machine a plan is checked against: the devices, and the training node's host memory and
disk for ``replay``'s checkpoints.

A plan is usually made on a login node or a laptop for a run on a GPU node, so this machine's
memory and disk say nothing about the run's: they are read here only for a local run (the
command decides which), and otherwise the node's figures are whatever the user passes, or
not checked at all.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dpg_lightning.planning.cost import GiB


@dataclass(frozen=True)
class Capacity:
    """Bytes available for something, and where that figure came from (printed with it)."""

    bytes: int
    source: str


@dataclass(frozen=True)
class Machine:
    """The devices' memory and speed, and the training node's storage (``None``: unknown, so
    not checked)."""

    gpu_memory: float  # GiB per device
    tflops: float  # dense bf16 per device
    tflops_fp32: float
    mfu: float  # fraction of peak reached
    hbm_tbps: float  # memory bandwidth, bounds decoding
    gpus_per_node: int = 8  # ranks sharing one host's memory and disk
    host: Capacity | None = None
    disk: Capacity | None = None

    @property
    def capacity(self) -> float:
        """Device memory in bytes."""
        return self.gpu_memory * GiB


def local_host_memory() -> Capacity:
    """This machine's available memory (``MemAvailable``), for a run on this machine."""
    available = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    return Capacity(available, "available on this machine")


def local_free_disk(directory: str | None) -> Capacity:
    """Free space for checkpoints written under ``directory`` (the temp dir when unset) on this
    machine: measured at its nearest existing parent, since the run creates it."""
    path = Path(directory or tempfile.gettempdir()).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return Capacity(shutil.disk_usage(path).free, f"free at {path} on this machine")
