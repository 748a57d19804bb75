"""Memory knobs of the inner SFT, side by side: peak memory and time of one metagradient.

Knobs (``InnerConfig``): which parameters the inner SFT trains (``train_params``: all, the LM
head, the last N blocks), ``autocast: bf16`` for the inner forward, and
``activation_checkpointing`` (``func`` backend). Why a separate script: the knobs trade
memory for exactness or for a different SFT, so each row also reports how well its rewards
agree with the full-precision, all-parameter rewards of the same run (Pearson r; rewards of a
different SFT are expected to differ, bf16 and checkpointing are not).

The measurement method is ``harness.py``'s (which says why), shared with ``metagrad_cost.py``:
CPU time with one intra-op thread, the fastest of interleaved repeats, and peak memory as the
extra memory of one call above what was live before it (``torch.cuda.max_memory_allocated`` on
CUDA; on CPU the resident-set peak, measured in a child process with glibc told to hand freed
buffers back to the OS).

``Phi`` here is the negative mean token loss of the target on a fixed held-out batch, not the
LM-head norm: a metric of the LM head alone would not depend on the last blocks' weights, so the
last-N-blocks rows would have nothing to differentiate.

Usage::

    python -m benchmarks.knobs                          # small GPT-2 shape, 4 steps
    python -m benchmarks.knobs --size gpt2 --steps 2 --device cuda
    python -m benchmarks.knobs --arch llama             # untied LM head
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from dataclasses import asdict, dataclass

import torch

from benchmarks.harness import (
    SIZES,
    build_target,
    fastest,
    held_out_loss,
    lowest_peak,
    machine_line,
    make_data,
    measure,
    memory_in_child,
    mib,
    reexec_with_malloc_env,
)
from dpg_lightning.inner import (
    InnerConfig,
    InnerOptimConfig,
    RankOrder,
    inner_order,
    metagradient_rewards,
    run_sft,
    trainable_names,
)


@dataclass
class Knob:
    """One configuration of the inner SFT to measure (``reference``: the row rewards are
    compared against)."""

    name: str
    backend: str = "func"
    train_params: str = "all"
    autocast: str = "none"
    activation_checkpointing: bool = False


@dataclass
class Row:
    """Fastest CPU/wall seconds of one metagradient, its peak extra bytes, and agreement."""

    knob: str
    trained: float  # trained parameters, millions
    cpu: float
    wall: float
    sft_cpu: float
    peak: int | None = None
    sft_peak: int | None = None
    pearson: float | None = None


def last_blocks(arch: str, num_layers: int, n: int) -> str:
    """A ``train_params`` regex for the last ``n`` transformer blocks and the final norm.

    GPT-2's LM head is tied to the input embedding, so it is left out: training it would send
    the backward through every block down to the embedding, which is what this knob avoids.
    Llama's untied head is included.
    """
    idx = "|".join(str(i) for i in range(num_layers - n, num_layers))
    if arch == "gpt2":
        return rf"\.h\.({idx})\.|\.ln_f\."
    return rf"\.layers\.({idx})\.|^model\.norm\.|^lm_head\."


def knobs(arch: str, num_layers: int) -> list[Knob]:
    return [
        Knob("all (higher, default)", backend="higher"),
        Knob("all (func)"),
        Knob("lm_head", train_params="lm_head"),
        Knob("last 1 block", train_params=last_blocks(arch, num_layers, 1)),
        Knob("last 2 blocks", train_params=last_blocks(arch, num_layers, 2)),
        Knob("bf16 autocast", autocast="bf16"),
        Knob("activation ckpt", activation_checkpointing=True),
        Knob("bf16 + ckpt", autocast="bf16", activation_checkpointing=True),
    ]


def run(args: argparse.Namespace) -> list[Row]:
    """Measure every knob on one target, interleaved ``repeats`` times (fastest run kept)."""
    device = torch.device(args.device)
    memory = args.measure == "memory" or (args.measure == "both" and device.type == "cuda")
    target, tokenizer = build_target(args.size, device, arch=args.arch)
    n_params = sum(p.numel() for p in target.parameters())
    data = make_data(tokenizer, args.steps * args.batch_size, args.chars, seed=0).to(device)
    phi = held_out_loss(tokenizer, args.chars, 1, device)
    order = inner_order(len(data), args.batch_size, False, 0)
    optim = InnerOptimConfig("adam", lr=1e-4, eps_root=1e-8)
    rows_knobs = knobs(args.arch, SIZES[args.size]["num_layers"])
    if args.measure != "memory":
        print(
            f"\n## {args.size} {args.arch}: {n_params / 1e6:.1f}M parameters, Adam, "
            f"{args.steps} inner steps x batch {args.batch_size} x {args.chars + 2} tokens, "
            f"Phi = -held-out loss",
            flush=True,
        )
    cfgs = {
        k.name: InnerConfig(
            optim=optim, batch_size=args.batch_size, backend=k.backend,
            train_params=k.train_params, autocast=k.autocast,
            activation_checkpointing=k.activation_checkpointing,
        )
        for k in rows_knobs
    }
    eps = torch.ones(len(data), device=device)
    # Unmeasured warm-up of each path (thread pools, autocast caches, first-call allocations).
    small = inner_order(args.batch_size, args.batch_size, False, 0)
    for cfg in cfgs.values():
        metagradient_rewards(target, data, phi, cfg, RankOrder(small))
    methods = {"sft": lambda: run_sft(target, data, eps, phi, cfgs["all (func)"], order, False)}
    ranked = RankOrder(order)
    for name, cfg in cfgs.items():
        methods[name] = lambda cfg=cfg: metagradient_rewards(target, data, phi, cfg, ranked)
    runs: dict[str, list] = {name: [] for name in methods}
    for _ in range(1 if args.measure == "memory" else args.repeats):
        for name, fn in methods.items():
            runs[name].append(measure(fn, device, memory))
            gc.collect()
    sft = fastest(runs, "sft")
    ref = runs["all (func)"][0].out[0]
    named = dict(target.named_parameters())
    rows = []
    for k in rows_knobs:
        best = fastest(runs, k.name)
        rewards = best.out[0].float()
        pearson = float(torch.corrcoef(torch.stack([ref.float(), rewards]))[0, 1])
        trained = sum(named[n].numel() for n in trainable_names(target, k.train_params))
        rows.append(
            Row(
                knob=k.name, trained=trained / 1e6, cpu=best.cpu, wall=best.wall,
                sft_cpu=sft.cpu, peak=lowest_peak(runs, k.name), sft_peak=lowest_peak(runs, "sft"),
                pearson=pearson,
            )
        )
    return rows


HEADER = (
    "| knob | trained params (M) | CPU s | metagrad/SFT | vs all (func) | peak MiB "
    "| peak vs all (func) | Pearson r vs all (func) |\n|---|---|---|---|---|---|---|---|"
)


def table(rows: list[Row]) -> str:
    """Markdown rows; time ratios are CPU-time ratios, to plain SFT and to the func baseline."""
    base = next(r for r in rows if r.knob == "all (func)")
    out = [HEADER]
    for r in rows:
        peak_ratio = "n/a" if r.peak is None or not base.peak else f"{r.peak / base.peak:.2f}"
        out.append(
            f"| {r.knob} | {r.trained:.2f} | {r.cpu:.2f} | {r.cpu / r.sft_cpu:.2f} "
            f"| {r.cpu / base.cpu:.2f} | {mib(r.peak)} | {peak_ratio} | {r.pearson:.4f} |"
        )
    out.append(f"\nplain SFT (all, func): {base.sft_cpu:.2f} CPU s, peak {mib(base.sft_peak)} MiB")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--chars", type=int, default=62, help="bytes per example (tokens = chars + 2)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--measure", choices=["time", "memory", "both"], default="both")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    module = "benchmarks.knobs"
    if args.device == "cpu" and args.measure == "memory":
        # glibc reads these before the first allocation: re-execute with them set.
        reexec_with_malloc_env(module, argv)
    torch.set_num_threads(args.threads)
    if args.measure != "memory":
        print(machine_line(args.device, args.threads))
    rows = run(args)
    if args.device == "cpu" and args.measure == "both":
        # Peaks in a child with the freeing allocator (see harness.memory_in_child).
        peaks = {r["knob"]: r for r in memory_in_child(module, argv)}
        for r in rows:
            r.peak, r.sft_peak = peaks[r.knob]["peak"], peaks[r.knob]["sft_peak"]
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump([asdict(r) for r in rows], f)
    if args.measure != "memory":
        print(table(rows))


if __name__ == "__main__":
    main()
