"""``python -m dpg_lightning plan --config CFG``: does one DPG step of a config fit, how long?

Reads the config ``fit`` reads (the same keys and defaults; files it names need not exist),
builds no model and needs no GPU, and prints for one DPG step: rollouts and tokens, inner
steps and micro-batches, the estimated peak memory per device itemised by phase, ``replay``'s
checkpoint storage per rank and per node, and FLOPs with a time at ``--tflops`` x ``--mfu``.
The planner itself is :mod:`dpg_lightning.planning` (no Lightning); this module is the command:
it parses the arguments with the ``fit`` parser (which names the Lightning module) and decides
which machine the plan is checked against.

**Which machine.** The plan answers about the training node. A config whose trainer names a GPU
accelerator (``trainer.accelerator: gpu``, the paper configs) is taken to be planned away from
its node (a login node, a laptop), so this machine's memory and disk are not read: the node's
are ``--host_memory`` / ``--disk`` when given, else not checked and said so. A config without a
GPU trainer (the tiny CPU configs), or ``--local true``, runs here: this machine's available
memory and the free disk at ``replay.directory`` are checked.

Exit status: 0 when the step fits; 2 for a config that cannot run (``ConfigError``, as ``fit``
would say: an inner batch larger than the set, a model whose shape is unknown); 3
(:class:`~dpg_lightning.planning.fit.PlanDoesNotFit`) when the peak exceeds ``--gpu_memory`` or
the checkpoints exceed the node's host memory or disk, naming the knob to turn.
"""

from __future__ import annotations

from jsonargparse import ArgumentParser, Namespace

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.config_parser import run_config_parser
from dpg_lightning.planning.cost import GiB
from dpg_lightning.planning.estimate import Plan, estimate
from dpg_lightning.planning.fit import check_fits
from dpg_lightning.planning.inputs import inputs_from_config, is_gpu_trainer
from dpg_lightning.planning.machine import Capacity, Machine, local_free_disk, local_host_memory
from dpg_lightning.planning.render import render
from dpg_lightning.planning.shapes import SHAPE_KEYS

#: Options that must be > 0 when given.
POSITIVE = ("gpus", "gpu_memory", "tflops", "tflops_fp32", "mfu", "hbm_tbps", "prompt_tokens",
            "gpus_per_node", "host_memory", "disk")


def parser() -> ArgumentParser:
    """``fit``'s config parser plus the machine's options."""
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
    p.add_argument("--local", type=bool | None, default=None,
                   help="the run is on this machine: check its memory and disk for replay "
                        "(default: true unless trainer.accelerator is gpu)")
    p.add_argument("--host_memory", "--host-memory", type=float | None, default=None,
                   help="GiB of host memory per training node (default: this machine's "
                        "available memory for a local run, else not checked)")
    p.add_argument("--disk", type=float | None, default=None,
                   help="GiB free for replay checkpoints on the training node (default: free "
                        "at replay.directory here for a local run, else not checked)")
    p.add_argument("--generator_shape", "--generator-shape", type=str | None, default=None,
                   help=f"the generator's shape if not known: {SHAPE_KEYS} as key=value,...")
    p.add_argument("--target_shape", "--target-shape", type=str | None, default=None,
                   help="the target's shape, as --generator_shape")
    return p


def machine_from_args(args: Namespace, replay_directory: str | None) -> Machine:
    """The devices from the options; the node's storage from the options, else this machine's
    for a local run (see the module docstring), else unknown."""
    trainer = args.as_dict().get("trainer")
    local = args.local if args.local is not None else not is_gpu_trainer(trainer)
    host = (Capacity(int(args.host_memory * GiB), "--host_memory")
            if args.host_memory is not None else local_host_memory() if local else None)
    disk = (Capacity(int(args.disk * GiB), "--disk")
            if args.disk is not None else local_free_disk(replay_directory) if local else None)
    return Machine(gpu_memory=args.gpu_memory, tflops=args.tflops,
                   tflops_fp32=args.tflops_fp32, mfu=args.mfu, hbm_tbps=args.hbm_tbps,
                   gpus_per_node=args.gpus_per_node, host=host, disk=disk)


def main(argv: list[str] | None = None) -> Plan:
    """``python -m dpg_lightning plan``: print the plan; raise when it does not fit."""
    args = parser().parse_args(argv)
    for name in POSITIVE:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ConfigError(f"`--{name}` is {getattr(args, name)}; it must be > 0")
    inputs, sources = inputs_from_config(
        args.as_dict(), gpus=args.gpus, prompt_tokens=args.prompt_tokens,
        generator_shape=args.generator_shape, target_shape=args.target_shape,
    )
    plan = estimate(inputs)
    machine = machine_from_args(args, inputs.inner.replay.directory)
    print(render(plan, machine, sources), flush=True)
    check_fits(plan, machine)
    return plan
