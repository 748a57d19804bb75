"""Whether a step fits the machine, and what to change when it does not.

Three limits: the device's memory (the step's peak), and, for ``replay``, the training node's
host memory (recompute buffers, and checkpoints with ``storage: cpu``) and disk (checkpoints
with ``storage: disk``). A node limit that is not known (:class:`Machine`'s ``host`` or
``disk`` is ``None``) is not checked. The message puts each overflow and each remedy on its
own line, so that a remedy can be read, and copied, whole.
"""

from __future__ import annotations

from dpg_lightning.common.errors import RunError
from dpg_lightning.planning.cost import GiB
from dpg_lightning.planning.estimate import Plan
from dpg_lightning.planning.machine import Machine
from dpg_lightning.planning.search import knobs


class PlanDoesNotFit(RunError):
    """The config is valid but one step needs more memory or storage than there is."""

    exit_code = 3


def gib(n: float) -> str:
    """Bytes as GiB with two decimals, as the plan prints them."""
    return f"{n / GiB:.2f}"


def _problem(what: str, remedies: list[str]) -> list[str]:
    return [f"  {what}; try:" if remedies else f"  {what}"] + [
        f"    {'or ' if i else ''}{r}" for i, r in enumerate(remedies)]


def problems(plan: Plan, machine: Machine) -> list[str]:
    """The lines of what overflows and what to change (empty when the step fits)."""
    lines: list[str] = []
    peak, phase = plan.peak
    capacity = machine.capacity
    if peak > capacity:
        what = (f"device memory: the peak, {gib(peak)} GiB in the {phase}, exceeds "
                f"--gpu_memory {gib(capacity)} GiB")
        if plan.held > capacity:
            lines += _problem(what + "; the weights and optimizer state alone exceed it: a "
                              "smaller model", [])
        else:
            lines += _problem(what, knobs(plan, capacity))
    if not plan.saved_states:
        return lines
    rcfg = plan.inputs.inner.replay
    on_host, on_disk = plan.replay_per_node(machine.gpus_per_node)
    host, disk = machine.host, machine.disk
    if host is not None and on_host > host.bytes:
        fix = ("`model.inner.replay.storage: disk`" if rcfg.storage == "cpu" else
               "`model.inner.replay.checkpoint: every_k` with a smaller `k` (the recompute "
               "buffer holds k - 1 states)")
        given = host.source == "--host_memory"
        lines += _problem(
            f"host memory: replay keeps {gib(on_host)} GiB per node, more than the "
            f"{gib(host.bytes)} GiB ({host.source})",
            [fix] + ([] if given else ["the training node's --host_memory"]))
    if disk is not None and on_disk > disk.bytes:
        fewer = ("`model.inner.replay.checkpoint: sqrt`" if rcfg.checkpoint == "every" else
                 "`model.inner.replay.checkpoint: every_k` with a larger `k`")
        given = disk.source == "--disk"
        lines += _problem(
            f"disk: replay writes {gib(on_disk)} GiB of checkpoints per node, more than the "
            f"{gib(disk.bytes)} GiB ({disk.source})",
            [fewer, "another `model.inner.replay.directory`"]
            + ([] if given else ["the training node's --disk"]))
    return lines


def check_fits(plan: Plan, machine: Machine) -> None:
    """Raise :class:`PlanDoesNotFit` naming what overflows and what to change."""
    found = problems(plan, machine)
    if found:
        raise PlanDoesNotFit("\n".join(["one DPG step does not fit:", *found]))
