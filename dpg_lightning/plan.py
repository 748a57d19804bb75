"""``python -m dpg_lightning plan --config CFG``: does one DPG step of a config fit, how long?

Reads the config ``fit`` reads (the same keys and defaults; files it names need not exist),
builds no model and needs no GPU, and prints for one DPG step: rollouts and tokens, inner
steps and micro-batches, the estimated peak memory per device itemised by phase (rollout,
inner SFT, policy update, on top of what the whole step holds), ``replay``'s checkpoint
storage, and FLOPs with a time at ``--tflops`` x ``--mfu``. The memory/FLOP model, and where
model shapes come from without any network, is :mod:`dpg_lightning.planning.cost`; its accuracy
is measured in ``benchmarks/README.md`` ("Planner check").

Exit status: 0 when the step fits; 2 for a config that cannot run (``ConfigError``, as ``fit``
would say: an inner batch larger than the set, a model whose shape is unknown); 3
(:class:`PlanDoesNotFit`) when the peak exceeds ``--gpu_memory`` or the checkpoints exceed the
host memory or disk, naming the knob to turn."""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import typing
from dataclasses import dataclass, replace
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from dpg_lightning.common.errors import ConfigError, RunError
from dpg_lightning.config_parser import run_config_parser
from dpg_lightning.dpg.policy import PolicyConfig
from dpg_lightning.dpg.rollout import SamplingConfig
from dpg_lightning.inner import InnerConfig
from dpg_lightning.inner.replay_storage import checkpoint_steps
from dpg_lightning.models.build import ModelConfig
from dpg_lightning.planning.cost import (
    GiB,
    Inner,
    Rollout,
    checkpoint_bytes,
    generator_persistent,
    inner_terms,
    policy_update_bytes,
    rollout_bytes,
    slots,
    step_flops,
)
from dpg_lightning.planning.shapes import SHAPE_KEYS, ModelShape, resolve_shape


class PlanDoesNotFit(RunError):
    """The config is valid but one step needs more memory or storage than there is."""

    exit_code = 3


@dataclass(frozen=True)
class Config:
    """What the plan depends on: the parsed settings plus the machine (options)."""

    gen: ModelShape
    target: ModelShape
    inner: InnerConfig
    sampling: SamplingConfig
    policy: PolicyConfig
    reward: str
    distributed: str
    sft_groups: str
    num_prompts: int
    gpus: int
    prompt_tokens: int
    gen_compute_bytes: int
    same_tokenizer: bool


@dataclass
class Plan:
    """One step's numbers: counts, memory by phase (name -> items), checkpoints, FLOPs."""

    cfg: Config
    rows: int
    set_size: int
    steps: int
    inner: Inner
    rollout: Rollout
    persistent: list[tuple[str, int]]
    phases: dict[str, list[tuple[str, int]]]
    stored: int = 0
    host_buffer: int = 0
    saved_states: int = 0

    @property
    def peak(self) -> tuple[int, str]:
        """Peak bytes and the phase that sets it."""
        base = sum(b for _, b in self.persistent)
        phase = max(self.phases, key=lambda p: sum(b for _, b in self.phases[p]))
        return base + sum(b for _, b in self.phases[phase]), phase


def evaluate(cfg: Config) -> Plan:
    """The plan of one step of ``cfg``; raises :class:`ConfigError` where ``fit`` would."""
    inner_cfg, sampling, policy = cfg.inner, cfg.sampling, cfg.policy
    rows = cfg.num_prompts * sampling.samples_per_prompt
    shared = cfg.distributed == "shared" and cfg.gpus > 1
    set_size = rows * cfg.gpus if shared else rows
    if inner_cfg.batch_size > set_size:
        raise ConfigError(
            f"`model.inner.batch_size` is {inner_cfg.batch_size} but the synthetic set has "
            f"{set_size} examples (num_prompts x samples_per_prompt{' x ranks' if shared else ''})"
            ": choose 1 <= inner.batch_size <= that"
        )
    # sft_groups: inverse: one SFT per inverse group (the k-th sample of every prompt), each
    # with batches of at most the group's size, one after the other.
    sfts = sampling.samples_per_prompt if cfg.sft_groups == "inverse" else 1
    sft_rows, sft_set = rows // sfts, set_size // sfts
    batch = min(inner_cfg.batch_size, sft_set)
    steps = math.ceil(sft_set / batch)
    per_step = min(sft_rows, math.ceil(batch / cfg.gpus) if shared else batch)
    target, gen = cfg.target, cfg.gen
    trained = (target.vocab * target.hidden if inner_cfg.train_params == "lm_head"
               else target.params) * target.bytes_per_param
    seq = inner_cfg.max_length
    if cfg.same_tokenizer:
        seq = min(seq, sampling.max_new_tokens + 2)
    inner = Inner(
        backend=inner_cfg.backend, optim=inner_cfg.optim.name, momentum=inner_cfg.optim.momentum,
        trained_bytes=trained, steps=steps, rows_per_step=per_step, rows_total=sft_rows,
        micro_rows=min(inner_cfg.micro_batch_size or per_step, per_step), seq=seq,
        offload_adjoint=inner_cfg.replay.offload_adjoint, reward=cfg.reward, shared=shared,
        sfts=sfts,
    )
    updates = (policy.num_minibatches if policy.minibatch_prompts is None
               else math.ceil(cfg.num_prompts / policy.minibatch_prompts))
    rollout = Rollout(
        rows=rows, prompt=cfg.prompt_tokens, new=sampling.max_new_tokens,
        chunk=min(rows, sampling.generation_batch_size or rows),
        minibatch=math.ceil(rows / updates), updates=updates, micro=policy.micro_batch_size,
        compute_bytes=cfg.gen_compute_bytes, reference=policy.beta > 0,
    )
    persistent = generator_persistent(gen, rollout.reference)
    persistent.append(("target weights", target.params * target.bytes_per_param))
    phases = {
        "rollout": rollout_bytes(gen, rollout),
        "inner SFT": inner_terms(target, inner),
        "policy update": policy_update_bytes(gen, rollout),
    }
    plan = Plan(cfg, rows, set_size, steps, inner, rollout, persistent, phases)
    if inner.backend == "replay" and cfg.reward == "dpg":
        saved = checkpoint_steps(inner_cfg.replay, steps)
        segment = saved[1] - saved[0] if len(saved) > 1 else steps
        plan.saved_states = len(saved)
        plan.stored, plan.host_buffer = checkpoint_bytes(
            trained, slots(inner.optim, inner.momentum), len(saved), segment,
            inner.offload_adjoint,
        )
    return plan


# ----------------------------------------------------------------------------- the command


def _dataclass_of(tp: object) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)


def build(cls: type, value: object, **defaults: object):
    """A config dataclass from a parsed namespace, nested dataclasses included, so that its
    ``__post_init__`` checks run as when ``fit`` builds it."""
    if value is None:
        return cls(**defaults)
    data = value.as_dict() if isinstance(value, Namespace) else dict(value)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = _dataclass_of(hints.get(f.name))
        if sub is not None and isinstance(data.get(f.name), dict):
            data[f.name] = build(sub, data[f.name])
    return cls(**data)


def parser() -> ArgumentParser:
    p = run_config_parser(
        "plan", "Memory, storage and time of one DPG step of a config, without a model."
    )
    p.add_argument("--ckpt_path", type=str | None, default=None, help="ignored")
    p.add_argument("--gpus", type=int | None, default=None,
                   help="ranks (default: trainer.devices x num_nodes on a GPU trainer, else 1)")
    p.add_argument("--gpus_per_node", "--gpus-per-node", type=int, default=8,
                   help="ranks sharing one host's memory (replay checkpoints)")
    p.add_argument("--gpu_memory", "--gpu-memory", type=float, default=139.0,
                   help="GiB per device (H200: 141 GB, about 139 GiB usable)")
    p.add_argument("--tflops", type=float, default=989.0,
                   help="dense bf16 TFLOPS per device (H200/H100 SXM: 989)")
    p.add_argument("--tflops_fp32", "--tflops-fp32", type=float, default=67.0,
                   help="fp32 TFLOPS per device (H200: 67; torch does not use TF32 by default)")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of peak FLOPS reached")
    p.add_argument("--hbm_tbps", "--hbm-tbps", type=float, default=4.8,
                   help="memory bandwidth TB/s (H200: 4.8): bounds token-by-token decoding")
    p.add_argument("--prompt_tokens", "--prompt-tokens", type=int, default=256,
                   help="assumed generator tokens per prompt (chat template included)")
    p.add_argument("--host_memory", "--host-memory", type=float | None, default=None,
                   help="GiB of host memory per node (default: available on this machine)")
    p.add_argument("--disk", type=float | None, default=None,
                   help="GiB free for replay checkpoints (default: free at replay.directory here)")
    p.add_argument("--generator_shape", "--generator-shape", type=str | None, default=None,
                   help=f"the generator's shape if not known: {SHAPE_KEYS} as key=value,...")
    p.add_argument("--target_shape", "--target-shape", type=str | None, default=None,
                   help="the target's shape, as --generator_shape")
    return p


def _gpus(args: Namespace) -> int:
    if args.gpus is not None:
        return args.gpus
    trainer = args.trainer or {}
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    gpu = str(trainer.get("accelerator", "auto")) in ("gpu", "cuda")
    return devices * nodes if gpu and isinstance(devices, int) and isinstance(nodes, int) else 1


def config_from_args(args: Namespace) -> tuple[Config, dict[str, str]]:
    """The plan's :class:`Config` from parsed arguments, and where each shape came from."""
    m = args.model
    gen_mc = build(ModelConfig, m.generator)
    target_mc = build(ModelConfig, m.target, seed=1)
    gen, gen_where = resolve_shape(gen_mc, "model.generator", args.generator_shape)
    target, target_where = resolve_shape(target_mc, "model.target", args.target_shape)
    precision = str((args.trainer or {}).get("precision", "32"))
    half = precision.startswith(("bf16", "16")) or gen_mc.dtype == "bfloat16"
    cfg = Config(
        gen=gen, target=target, inner=build(InnerConfig, m.inner),
        sampling=build(SamplingConfig, m.sampling), policy=build(PolicyConfig, m.policy),
        reward=m.reward, distributed=m.distributed, sft_groups=m.sft_groups,
        num_prompts=args.data.num_prompts,
        gpus=_gpus(args), prompt_tokens=args.prompt_tokens,
        gen_compute_bytes=2 if half else gen.bytes_per_param,
        same_tokenizer=(gen_mc.tokenizer or gen_mc.pretrained)
        == (target_mc.tokenizer or target_mc.pretrained),
    )
    return cfg, {"generator": gen_where, "target": target_where}


def main(argv: list[str] | None = None) -> Plan:
    """``python -m dpg_lightning plan``: print the plan; raise when it does not fit."""
    args = parser().parse_args(argv)
    for name in ("gpus", "gpu_memory", "tflops", "tflops_fp32", "mfu", "hbm_tbps",
                 "prompt_tokens", "gpus_per_node"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ConfigError(f"`--{name}` is {getattr(args, name)}; it must be > 0")
    cfg, where = config_from_args(args)
    plan = evaluate(cfg)
    host, disk = _host_and_disk(args, cfg.inner)
    print(render(plan, args, where, host, disk), flush=True)
    check_fits(plan, args.gpu_memory * GiB, host, disk, args.gpus_per_node)
    return plan


def _host_and_disk(args: Namespace, inner: InnerConfig) -> tuple[tuple[int, str], tuple[int, str]]:
    """Host memory per node and free disk for checkpoints, in bytes, with where they came
    from: the options, else this machine (MemAvailable; free space at the nearest existing
    parent of ``inner.replay.directory``)."""
    if args.host_memory is not None:
        host = (int(args.host_memory * GiB), "--host_memory")
    else:
        available = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
        host = (available, "available on this machine")
    if args.disk is not None:
        return host, (int(args.disk * GiB), "--disk")
    path = Path(inner.replay.directory or tempfile.gettempdir()).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return host, (shutil.disk_usage(path).free, f"free at {path} on this machine")


# ----------------------------------------------------------------------------- the report


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def render(plan: Plan, args: Namespace, where: dict[str, str], host: tuple[int, str],
           disk: tuple[int, str]) -> str:
    """The printed plan: counts, memory by phase, checkpoints, FLOPs and time."""
    cfg, inner, r = plan.cfg, plan.inner, plan.rollout
    sampling, policy, icfg = cfg.sampling, cfg.policy, cfg.inner
    shared = cfg.distributed == "shared" and cfg.gpus > 1
    lines = [
        f"plan: {cfg.gpus} rank(s) x {args.gpu_memory:g} GiB, {args.tflops:g} TFLOPS bf16 / "
        f"{args.tflops_fp32:g} fp32 x MFU {args.mfu:g}",
    ]
    m = args.model
    for name, shape, mc in (("generator", cfg.gen, m.generator), ("target", cfg.target, m.target)):
        label = mc.pretrained if mc is not None and mc.pretrained else "built"
        lines.append(f"  {name:<10} {label} ({shape.arch}): {_count(shape.params)} params, "
                     f"{shape.bytes_per_param} B each ({where[name]})")
    trains = icfg.train_params
    if trains not in ("all", "lm_head"):
        lines[-1] += f"; trains `{trains}`: counted as all (an upper bound)"
    lines += [
        "one DPG step",
        f"  rollouts       {cfg.num_prompts} prompts x {sampling.samples_per_prompt} samples = "
        f"{plan.rows} per rank, {plan.rows * cfg.gpus} in total",
        f"  tokens         {r.prompt} prompt (assumed, --prompt_tokens) + {r.new} new = "
        f"{r.prompt + r.new} per rollout, {plan.rows * (r.prompt + r.new):,} per rank",
        f"  inner steps    {plan.steps} = ceil(set {plan.set_size // inner.sfts} / "
        f"inner.batch_size {icfg.batch_size}); set: "
        f"{'all ranks (distributed: shared)' if shared else 'this rank'}"
        + (f"; x {inner.sfts} SFTs (sft_groups: inverse)" if inner.sfts > 1 else ""),
        f"  micro-batches  {inner.chunks} per inner step per rank, of {inner.micro_rows} rows x "
        f"{inner.seq} target tokens (inner.micro_batch_size {icfg.micro_batch_size})",
        f"  policy         {policy.num_iterations * r.updates} optimizer step(s) = "
        f"{policy.num_iterations} iteration(s) x {r.updates} minibatch(es) of "
        f"{r.minibatch} rollouts"
        + (f", in micro-batches of {r.policy_rows} (policy.micro_batch_size)"
           if r.policy_rows < r.minibatch else ""),
        f"peak memory per device{'GiB':>38}",
        "  held through the step",
    ]
    peak, top = plan.peak
    lines += [f"    {label:<52}{_gib(b):>8}" for label, b in plan.persistent]
    for phase, items in plan.phases.items():
        what = {"inner SFT": f" ({icfg.backend}, {icfg.optim.name})"}.get(phase, "")
        mark = "  <- peak" if phase == top else ""
        total = sum(b for _, b in items)
        lines.append(f"  {phase + what:<54}{_gib(total):>8}{mark}")
        lines += [f"    {label:<52}{_gib(b):>8}" for label, b in items]
    held = sum(b for _, b in plan.persistent)
    capacity = args.gpu_memory * GiB
    verdict = "fits" if peak <= capacity else "DOES NOT FIT"
    lines.append(f"  peak: {_gib(held)} held + {_gib(peak - held)} {top} = {_gib(peak)} GiB of "
                 f"{args.gpu_memory:g} ({100 * peak / capacity:.0f}%): {verdict}")
    if plan.saved_states:
        rcfg = icfg.replay
        per_node = min(cfg.gpus, args.gpus_per_node)
        place = "host memory" if rcfg.storage == "cpu" else "disk"
        lines += [
            f"replay checkpoints: {plan.saved_states} state(s) (checkpoint {rcfg.checkpoint}) of "
            f"trained params + moments, storage {rcfg.storage}",
            f"  stored {_gib(plan.stored)} GiB in {place} + recompute buffer "
            f"{_gib(plan.host_buffer)} GiB host, per rank; x {per_node} rank(s) per node",
            f"  host {_gib(host[0])} GiB ({host[1]}), disk {_gib(disk[0])} GiB ({disk[1]})",
        ]
    else:
        lines.append("replay checkpoints: none (" + (
            "reward: dataset" if cfg.reward == "dataset" else
            f"inner.backend {icfg.backend} keeps the SFT on the autograd tape") + ")")
    lines += _flop_lines(plan, args)
    return "\n".join(lines)


def _flop_lines(plan: Plan, args: Namespace) -> list[str]:
    """FLOPs per rank by phase and their time at the stated throughput x MFU (fp32 phases at
    ``--tflops_fp32``); decoding also takes at least the time to read the weights and the KV
    cache once per generated token (``--hbm_tbps``)."""
    cfg, r = plan.cfg, plan.rollout
    recompute = plan.steps - plan.saved_states if plan.saved_states else 0
    fl = step_flops(cfg.gen, cfg.target, r, plan.inner, cfg.policy.num_iterations, recompute)
    gen_rate = args.tflops if r.compute_bytes == 2 else args.tflops_fp32
    half_target = cfg.target.bytes_per_param == 2 or cfg.inner.autocast == "bf16"
    target_rate = args.tflops if half_target else args.tflops_fp32
    kv_per_token = 2 * cfg.gen.layers * cfg.gen.kv_heads * (cfg.gen.hidden // cfg.gen.heads)
    reads = math.ceil(r.rows / r.chunk) * r.new * (
        cfg.gen.params * cfg.gen.bytes_per_param
        + kv_per_token * (r.prompt + r.new / 2) * r.chunk * r.compute_bytes)
    lines = [f"FLOPs per rank{'TFLOP':>44}{'s':>10}"]
    total = 0.0
    for name, flops, rate in (
        ("rollout (2P / token)", fl.rollout, gen_rate),
        ("scoring old/ref log-probs (2P / token)", fl.scoring, gen_rate),
        ("policy update (6P / token / iteration)", fl.policy, gen_rate),
        ("inner SFT (6P / target token)", fl.inner_sft, target_rate),
        ("attribution (reverse pass / backward)", fl.attribution, target_rate),
    ):
        seconds = flops / (rate * 1e12 * args.mfu)
        note = ""
        if name.startswith("rollout"):
            bound = reads / (args.hbm_tbps * 1e12)
            note = f"  (>= {bound:.2f} s reading weights + KV cache)" if bound > seconds else ""
            seconds = max(seconds, bound)
        total += seconds
        lines.append(f"  {name:<46}{flops / 1e12:>12.1f}{seconds:>10.2f}{note}")
    steps = (args.trainer or {}).get("max_steps")  # counts generator updates
    steps = steps and math.ceil(steps / (cfg.policy.num_iterations * r.updates))
    extra = f"; x {steps} DPG steps (max_steps) = {total * steps / 3600:.1f} h" if steps else ""
    lines.append(f"  one DPG step{'':>46}{total:>10.2f}{extra} (validation not counted)")
    return lines


# ----------------------------------------------------------------------------- fitting


def _fits(cfg: Config, capacity: float) -> Plan | None:
    """The plan of ``cfg`` if it is valid and its peak fits ``capacity``, else ``None``."""
    try:
        plan = evaluate(cfg)
    except ConfigError:
        return None
    return plan if plan.peak[0] <= capacity else None


def knobs(plan: Plan, capacity: float) -> list[str]:
    """Settings that would make the peak fit, each checked by evaluating the changed config."""
    cfg, inner = plan.cfg, plan.inner
    phase = plan.peak[1]
    icfg, out = cfg.inner, []

    def with_inner(**changes) -> Config:
        return replace(cfg, inner=replace(icfg, **changes))

    if phase == "inner SFT" and icfg.backend == "replay":
        fitting = [m for m in range(inner.micro_rows - 1, 0, -1)
                   if _fits(with_inner(micro_batch_size=m), capacity)]
        out.append(f"`model.inner.micro_batch_size: {fitting[0]}`" if fitting else
                   "`model.inner.micro_batch_size` (even 1 is not enough alone)")
        if not icfg.replay.offload_adjoint:
            out.append("`model.inner.replay.offload_adjoint: true` (storage cpu for a GPU target)")
    elif phase == "inner SFT":
        alt = replace(cfg, inner=replace(icfg, backend="replay", activation_checkpointing=False,
                                         autocast="none"))
        replay = [m for m in range(inner.micro_rows, 0, -1) if _fits(
            replace(alt, inner=replace(alt.inner, micro_batch_size=m)), capacity)]
        if replay:
            out.append(f"`model.inner.backend: replay` with `model.inner.micro_batch_size: "
                       f"{replay[0]}` (memory flat in the inner steps)")
        for gpus in (2 * cfg.gpus, 4 * cfg.gpus, 8 * cfg.gpus):
            prompts = math.ceil(cfg.num_prompts * cfg.gpus / gpus)
            if _fits(replace(cfg, gpus=gpus, num_prompts=prompts), capacity):
                out.append(f"more GPUs: `--gpus {gpus}` with `data.num_prompts: {prompts}` "
                           "(the same set, fewer examples per rank)")
                break
    elif phase == "rollout":
        size = plan.rollout.chunk // 2
        while size >= 1 and not _fits(replace(cfg, sampling=replace(
                cfg.sampling, generation_batch_size=size)), capacity):
            size //= 2
        out.append(f"`model.sampling.generation_batch_size: {max(size, 1)}`")
    else:
        rows = plan.rollout.policy_rows
        micro = next((m for m in range(rows - 1, 0, -1) if rows % m == 0  # even micro-batches
                      and _fits(replace(cfg, policy=replace(cfg.policy, micro_batch_size=m)),
                                capacity)), None)
        if micro:  # the same update, accumulated: the first knob to turn
            out.append(f"`model.policy.micro_batch_size: {micro}` (the same update)")
        n = plan.rollout.updates * 2
        while n < plan.rows and not _fits(replace(cfg, policy=replace(
                cfg.policy, num_minibatches=n, minibatch_prompts=None)), capacity):
            n *= 2
        fewer = math.ceil(cfg.num_prompts / n)
        out.append((f"`model.policy.minibatch_prompts: {fewer}`" if cfg.policy.minibatch_prompts
                    else f"`model.policy.num_minibatches: {min(n, plan.rows)}`")
                   + " (more, smaller optimizer steps: a different update)")
    return out


def check_fits(plan: Plan, capacity: float, host: tuple[int, str], disk: tuple[int, str],
               gpus_per_node: int) -> None:
    """Raise :class:`PlanDoesNotFit` naming what overflows and what to change."""
    problems = []
    peak, phase = plan.peak
    if peak > capacity:
        held = sum(b for _, b in plan.persistent)
        hint = ("the weights and optimizer state alone exceed it: a smaller model" if held
                > capacity else "try " + ", or ".join(knobs(plan, capacity)))
        problems.append(f"the peak, {_gib(peak)} GiB in the {phase}, exceeds --gpu_memory "
                        f"{_gib(capacity)} GiB; {hint}")
    if plan.saved_states:
        rcfg, node = plan.cfg.inner.replay, min(plan.cfg.gpus, gpus_per_node)
        on_host = (plan.host_buffer + plan.stored * (rcfg.storage == "cpu")) * node
        if on_host > host[0]:
            fix = ("`model.inner.replay.storage: disk`" if rcfg.storage == "cpu" else
                   "`model.inner.replay.checkpoint: every_k` with a smaller `k` (the recompute "
                   "buffer holds k - 1 states)")
            problems.append(f"replay keeps {_gib(on_host)} GiB in host memory per node but "
                            f"{_gib(host[0])} GiB is {host[1]}; use {fix}, or pass the "
                            "training node's --host_memory")
        if rcfg.storage == "disk" and plan.stored * node > disk[0]:
            fewer = ("`model.inner.replay.checkpoint: sqrt`" if rcfg.checkpoint == "every" else
                     "`model.inner.replay.checkpoint: every_k` with a larger `k`")
            problems.append(f"replay writes {_gib(plan.stored * node)} GiB of checkpoints per "
                            f"node but {_gib(disk[0])} GiB is {disk[1]}; use {fewer}, another "
                            "`model.inner.replay.directory`, or pass the training node's --disk")
    if problems:
        raise PlanDoesNotFit("; ".join(problems))
