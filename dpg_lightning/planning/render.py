"""The printed plan: the models, one step's counts, memory by phase, ``replay``'s checkpoints,
FLOPs and time.

Every count is shown with the settings it comes from (``inner.batch_size``, ``sft_groups``
...), so that a user can see which key to change; lines stay short enough to read in a
terminal, one fact each.
"""

from __future__ import annotations

from dpg_lightning.planning.estimate import Plan, phase_times
from dpg_lightning.planning.fit import gib
from dpg_lightning.planning.inputs import ShapeSource
from dpg_lightning.planning.machine import Capacity, Machine


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def render(plan: Plan, machine: Machine, sources: dict[str, ShapeSource]) -> str:
    """The whole plan as text."""
    inputs = plan.inputs
    lines = [
        f"plan: {inputs.gpus} rank(s) x {machine.gpu_memory:g} GiB, {machine.tflops:g} TFLOPS "
        f"bf16 / {machine.tflops_fp32:g} fp32 x MFU {machine.mfu:g}",
    ]
    for name, shape in (("generator", inputs.gen), ("target", inputs.target)):
        source = sources[name]
        lines.append(f"  {name:<10} {source.label} ({shape.arch}): {_count(shape.params)} "
                     f"params, {shape.bytes_per_param} B each")
        lines.append(f"  {'':<10} shape: {source.where}")
    trains = inputs.inner.train_params
    if trains not in ("all", "lm_head"):
        lines.append(f"  {'':<10} trains `{trains}`: counted as all (an upper bound)")
    lines += _step_lines(plan)
    lines += _memory_lines(plan, machine)
    lines += _replay_lines(plan, machine)
    lines += _time_lines(plan, machine)
    return "\n".join(lines)


def _step_lines(plan: Plan) -> list[str]:
    """Rollouts, tokens, inner steps, micro-batches and policy updates of one step."""
    inputs, inner, r = plan.inputs, plan.inner, plan.rollout
    sampling, policy, icfg = inputs.sampling, inputs.policy, inputs.inner
    return [
        "one DPG step",
        f"  rollouts       {inputs.num_prompts} prompts x {sampling.samples_per_prompt} samples "
        f"= {plan.rows} per rank, {plan.rows * inputs.gpus} in total",
        f"  tokens         {r.prompt} prompt (assumed, --prompt_tokens) + {r.new} new = "
        f"{r.prompt + r.new} per rollout, {plan.rows * (r.prompt + r.new):,} per rank",
        f"  inner steps    {plan.steps} = ceil(set {plan.sft_set.size} / "
        f"inner.batch_size {icfg.batch_size}); set: "
        f"{'all ranks (distributed: shared)' if inputs.shared else 'this rank'}"
        + (f"; x {inner.sfts} SFTs (sft_groups: inverse)" if inner.sfts > 1 else ""),
        f"  micro-batches  {inner.chunks} per inner step per rank, of {inner.micro_rows} rows x "
        f"{inner.seq} target tokens (inner.micro_batch_size {icfg.micro_batch_size})",
        f"  policy         {policy.num_iterations * r.updates} optimizer step(s) = "
        f"{policy.num_iterations} iteration(s) x {r.updates} minibatch(es) of "
        f"{r.minibatch} rollouts"
        + (f", in micro-batches of {r.policy_rows} (policy.micro_batch_size)"
           if r.policy_rows < r.minibatch else ""),
    ]


def _memory_lines(plan: Plan, machine: Machine) -> list[str]:
    """Peak memory per device: what the step holds, each phase on top, and the verdict."""
    icfg = plan.inputs.inner
    lines = [f"peak memory per device{'GiB':>38}", "  held through the step"]
    peak, top = plan.peak
    lines += [f"    {label:<52}{gib(b):>8}" for label, b in plan.persistent]
    for phase, items in plan.phases.items():
        what = {"inner SFT": f" ({icfg.backend}, {icfg.optim.name})"}.get(phase, "")
        mark = "  <- peak" if phase == top else ""
        total = sum(b for _, b in items)
        lines.append(f"  {phase + what:<54}{gib(total):>8}{mark}")
        lines += [f"    {label:<52}{gib(b):>8}" for label, b in items]
    capacity = machine.capacity
    verdict = "fits" if peak <= capacity else "DOES NOT FIT"
    lines.append(f"  peak: {gib(plan.held)} held + {gib(peak - plan.held)} {top} = {gib(peak)} "
                 f"GiB of {machine.gpu_memory:g} ({100 * peak / capacity:.0f}%): {verdict}")
    return lines


def _verdict(need: int, have: Capacity) -> str:
    return "fits" if need <= have.bytes else "DOES NOT FIT"


def _replay_lines(plan: Plan, machine: Machine) -> list[str]:
    """``replay``'s checkpoints per rank and per node, against the node's storage where it is
    known; otherwise a note that it was not checked, and how to check it."""
    inputs, icfg = plan.inputs, plan.inputs.inner
    if not plan.saved_states:
        return ["replay checkpoints: none (" + (
            "reward: dataset" if inputs.reward == "dataset" else
            f"inner.backend {icfg.backend} keeps the SFT on the autograd tape") + ")"]
    rcfg = icfg.replay
    place = "in host memory" if rcfg.storage == "cpu" else "on disk"
    node = min(inputs.gpus, machine.gpus_per_node)
    on_host, on_disk = plan.replay_per_node(machine.gpus_per_node)
    lines = [
        f"replay checkpoints: {plan.saved_states} state(s) (checkpoint {rcfg.checkpoint}) of "
        f"trained params + moments, storage {rcfg.storage}",
        f"  per rank       {gib(plan.stored)} GiB stored {place} + "
        f"{gib(plan.host_buffer)} GiB recompute buffer in host memory",
        f"  per node       {gib(on_host)} GiB host memory, {gib(on_disk)} GiB disk "
        f"({node} rank(s) per node, --gpus_per_node)",
    ]
    host, disk = machine.host, machine.disk
    if host is not None:
        lines.append(f"  host memory    {gib(host.bytes)} GiB ({host.source}): "
                     f"{_verdict(on_host, host)}")
    if disk is not None and on_disk:
        lines.append(f"  disk           {gib(disk.bytes)} GiB ({disk.source}): "
                     f"{_verdict(on_disk, disk)}")
    unknown = [flag for flag, capacity in (("--host_memory", host), ("--disk", disk))
               if capacity is None and (flag == "--host_memory" or on_disk)]
    if unknown:
        lines += [
            f"  not checked    the training node's {' and '.join(unknown)} (GiB): pass them,",
            "                 or --local true to check this machine's (for a run here)",
        ]
    return lines


def _time_lines(plan: Plan, machine: Machine) -> list[str]:
    """FLOPs and seconds per phase, one step's time and the run's (``trainer.max_steps``
    counts DPG steps)."""
    lines = [f"FLOPs per rank{'TFLOP':>44}{'s':>10}"]
    total = 0.0
    for t in phase_times(plan, machine):
        note = f"  (>= {t.seconds:.2f} s reading weights + KV cache)" if t.bound else ""
        total += t.seconds
        lines.append(f"  {t.name:<46}{t.flops / 1e12:>12.1f}{t.seconds:>10.2f}{note}")
    lines.append(f"  one DPG step{'':>46}{total:>10.2f}  (validation not counted)")
    steps = plan.inputs.max_steps
    if steps:
        lines.append(f"  the run        {steps} DPG steps (trainer.max_steps) = "
                     f"{total * steps / 3600:.1f} h")
    return lines
