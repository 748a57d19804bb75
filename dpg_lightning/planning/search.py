"""The knob search: which setting would make a step's peak fit the device.

Each proposal is checked by estimating the changed inputs again, not guessed from the
numbers, so a user who applies it gets a plan that fits. The knob depends on the phase that
sets the peak; where a knob keeps the same update (micro-batches accumulated) it comes first.
"""

from __future__ import annotations

import math
from dataclasses import replace

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.planning.estimate import Plan, estimate
from dpg_lightning.planning.inputs import PlanInputs


def _fits(inputs: PlanInputs, capacity: float) -> Plan | None:
    """The plan of ``inputs`` if it is valid and its peak fits ``capacity``, else ``None``."""
    try:
        plan = estimate(inputs)
    except ConfigError:
        return None
    return plan if plan.peak[0] <= capacity else None


def knobs(plan: Plan, capacity: float) -> list[str]:
    """Settings that would make the peak fit ``capacity`` bytes, as ``key: value`` in
    backquotes (what a command line override takes), with why in parentheses."""
    inputs, inner = plan.inputs, plan.inner
    phase = plan.peak[1]
    icfg, out = inputs.inner, []

    def with_inner(**changes) -> PlanInputs:
        return replace(inputs, inner=replace(icfg, **changes))

    if phase == "inner SFT" and icfg.backend == "replay":
        fitting = [m for m in range(inner.micro_rows - 1, 0, -1)
                   if _fits(with_inner(micro_batch_size=m), capacity)]
        out.append(f"`model.inner.micro_batch_size: {fitting[0]}`" if fitting else
                   "`model.inner.micro_batch_size` (even 1 is not enough alone)")
        if not icfg.replay.offload_adjoint:
            out.append("`model.inner.replay.offload_adjoint: true` (storage cpu for a GPU target)")
    elif phase == "inner SFT":
        alt = replace(inputs, inner=replace(icfg, backend="replay",
                                            activation_checkpointing=False, autocast="none"))
        replay = [m for m in range(inner.micro_rows, 0, -1) if _fits(
            replace(alt, inner=replace(alt.inner, micro_batch_size=m)), capacity)]
        if replay:
            out.append(f"`model.inner.backend: replay` with `model.inner.micro_batch_size: "
                       f"{replay[0]}` (memory flat in the inner steps)")
        for gpus in (2 * inputs.gpus, 4 * inputs.gpus, 8 * inputs.gpus):
            prompts = math.ceil(inputs.num_prompts * inputs.gpus / gpus)
            if _fits(replace(inputs, gpus=gpus, num_prompts=prompts), capacity):
                out.append(f"more GPUs: `--gpus {gpus}` with `data.num_prompts: {prompts}` "
                           "(the same set, fewer examples per rank)")
                break
    elif phase == "rollout":
        size = plan.rollout.chunk // 2
        while size >= 1 and not _fits(replace(inputs, sampling=replace(
                inputs.sampling, generation_batch_size=size)), capacity):
            size //= 2
        out.append(f"`model.sampling.generation_batch_size: {max(size, 1)}`")
    else:
        out += _policy_knobs(plan, capacity)
    return out


def _policy_knobs(plan: Plan, capacity: float) -> list[str]:
    """The policy update's knobs: micro-batches that divide the minibatch evenly (the same
    update, accumulated), then more, smaller minibatches (a different update)."""
    inputs = plan.inputs
    out = []
    rows = plan.rollout.policy_rows
    micro = next((m for m in range(rows - 1, 0, -1) if rows % m == 0
                  and _fits(replace(inputs, policy=replace(inputs.policy, micro_batch_size=m)),
                            capacity)), None)
    if micro:
        out.append(f"`model.policy.micro_batch_size: {micro}` (the same update)")
    n = plan.rollout.updates * 2
    while n < plan.rows and not _fits(replace(inputs, policy=replace(
            inputs.policy, num_minibatches=n, minibatch_prompts=None)), capacity):
        n *= 2
    fewer = math.ceil(inputs.num_prompts / n)
    out.append((f"`model.policy.minibatch_prompts: {fewer}`" if inputs.policy.minibatch_prompts
                else f"`model.policy.num_minibatches: {min(n, plan.rows)}`")
               + " (more, smaller optimizer steps: a different update)")
    return out
