"""How many CPU threads torch uses: the CPUs this process can actually use, not the machine's.

torch sizes its intra-op pool by the machine's cores. When fewer are free (a busy neighbour on
a workstation, a Slurm task given a few CPUs of a large node, several ranks on one node) its
OpenMP threads spin waiting for each other on the cores they share, and a small step gets many
times slower (``benchmarks/README.md``). The count chosen here is

* the CPUs this process may run on (its affinity mask, a cgroup CPU quota, and
  ``SLURM_CPUS_PER_TASK``), shared between the ranks started on this node by Lightning
  (``LOCAL_WORLD_SIZE``);
* minus the CPUs other processes keep busy (measured over a quarter second from
  ``/proc/stat`` as this process starts; the 1-minute load average where that is unreadable),
  when this process may run on every CPU of the machine (a restricted mask or quota already
  excludes the others);
* at least 1.

``DPG_NUM_THREADS`` (or an explicit ``OMP_NUM_THREADS``) overrides it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ThreadChoice:
    """The chosen count and why: ``usable`` CPUs, ``busy`` of them taken by other work."""

    threads: int
    usable: int
    busy: int
    source: str  # "DPG_NUM_THREADS", "OMP_NUM_THREADS" or "available CPUs"


def _cgroup_cpus() -> int | None:
    """CPUs allowed by a cgroup v2 quota (``cpu.max``), if one is set."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def usable_cpus() -> tuple[int, bool]:
    """CPUs this process (one rank) may use, and whether that is restricted below the
    machine's count (then other processes' load is someone else's CPUs)."""
    machine = os.cpu_count() or 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = machine
    for limit in (_cgroup_cpus(), _positive_int(os.environ.get("SLURM_CPUS_PER_TASK"))):
        if limit is not None:
            cpus = min(cpus, limit)
    restricted = cpus < machine
    local_ranks = _positive_int(os.environ.get("LOCAL_WORLD_SIZE")) or 1
    return max(1, cpus // local_ranks), restricted or local_ranks > 1


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value else None
    except ValueError:
        return None
    return number if number and number > 0 else None


def busy_cpus(window: float = 0.25) -> float | None:
    """CPUs kept busy by other processes right now: the machine's busy share over ``window``
    seconds (while this process sleeps) times its CPU count; ``None`` where ``/proc/stat`` is
    not readable. The load average would lag a busy neighbour by a minute."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(window)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def choose_threads() -> ThreadChoice:
    """The intra-op thread count for this process (see the module docstring)."""
    for name in ("DPG_NUM_THREADS", "OMP_NUM_THREADS"):
        forced = _positive_int(os.environ.get(name))
        if forced:
            return ThreadChoice(forced, forced, 0, name)
    usable, restricted = usable_cpus()
    busy = 0
    if not restricted:
        measured = busy_cpus()
        if measured is None and hasattr(os, "getloadavg"):
            measured = os.getloadavg()[0]
        busy = min(usable - 1, round(measured or 0))
    return ThreadChoice(max(1, usable - busy), usable, busy, "available CPUs")


def configure_threads() -> ThreadChoice:
    """Set torch's intra-op threads to :func:`choose_threads` and return the choice."""
    choice = choose_threads()
    torch.set_num_threads(choice.threads)
    return choice
