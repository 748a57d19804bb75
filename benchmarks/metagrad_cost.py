"""Cost of the DPG metagradient relative to plain SFT, and its peak memory vs inner steps.

Measured side by side in one process, on the same target, data and inner steps:

* ``sft``: plain SFT of T steps (``run_sft(create_graph=False)``), the unit of cost;
* ``higher``: the default backend (whole unrolled SFT on the tape, then one backward);
* ``replay``: the step-wise backend (graph-free forward with checkpoints, then one step's graph
  at a time backwards), checkpoint policy and storage from the flags.

Measurement (``harness.py``, which says why): CPU time with one intra-op thread and wall time,
the fastest of ``--repeats`` interleaved runs per method, and peak memory as the extra above what
was live before the call (on CPU measured in a child process with a freeing allocator). Times
are reported as ratios to ``sft``, far steadier under contention than seconds; the replay
forward/reverse split is its wall-time split applied to its CPU time. Small-model peaks (a few
MiB) are within allocator noise, so read memory ratios on the ``gpt2`` size.

Usage::

    python -m benchmarks.metagrad_cost                         # tiny 1,4,16,64 + gpt2 1,2
    python -m benchmarks.metagrad_cost --size small --storage cpu
    python -m benchmarks.metagrad_cost --size gpt2 --steps 1,4,16,64,96 --device cuda
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
    Run,
    build_target,
    fastest,
    lowest_peak,
    machine_line,
    make_data,
    make_phi,
    measure,
    memory_in_child,
    mib,
    ratio,
    reexec_with_malloc_env,
)
from dpg_lightning.inner import (
    InnerConfig,
    InnerOptimConfig,
    RankOrder,
    ReplayConfig,
    inner_order,
    metagradient_rewards,
    run_sft,
)


@dataclass
class Row:
    """One (size, inner steps) measurement: seconds (CPU and wall) and peak extra bytes."""

    size: str
    steps: int
    sft_cpu: float
    sft_wall: float
    higher_cpu: float | None
    higher_wall: float | None
    replay_cpu: float
    replay_wall: float
    replay_fwd_share: float
    sft_peak: int | None = None
    higher_peak: int | None = None
    replay_peak: int | None = None
    rel_diff: float | None = None
    weight_bytes: int = 0  # the target's own weights, live before every call


def run_size(args: argparse.Namespace, size: str, steps: list[int]) -> list[Row]:
    """Measure every method at every step count on one target size.

    The methods run interleaved (sft, higher, replay, sft, higher, replay, ...) and each keeps
    its fastest run, so a burst of load from other jobs hits all three alike.
    """
    device = torch.device(args.device)
    memory = args.measure in ("memory", "both")
    target, tokenizer = build_target(size, device, arch="gpt2", dtype=args.dtype)
    n_params = sum(p.numel() for p in target.parameters())
    print(
        f"\n## {size}: GPT-2 shaped, {n_params / 1e6:.1f}M parameters, {args.dtype}, "
        f"optimizer {args.optim}, batch {args.batch_size} x {args.chars + 2} tokens, "
        f"Phi {args.phi}",
        flush=True,
    )
    print(HEADER, flush=True)
    optim = InnerOptimConfig(args.optim, lr=1e-4, eps_root=1e-8 if args.optim != "sgd" else 0.0)
    phi = make_phi(args.phi, tokenizer, args.chars, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in target.parameters())
    repeats = args.repeats or (3 if size == "tiny" else 2)
    if args.measure == "memory":
        repeats = 1
    if size == "tiny":
        # First calls allocate caches (thread pools, kernels, autograd bookkeeping) that would be
        # charged to the first measurement; a small model can afford one unmeasured run each.
        data = make_data(tokenizer, args.batch_size, args.chars, seed=-1).to(device)
        order = inner_order(len(data), args.batch_size, False, 0)
        for backend in ("higher", "replay"):
            warm = InnerConfig(optim=optim, batch_size=args.batch_size, backend=backend)
            metagradient_rewards(target, data, phi, warm, RankOrder(order))
    rcfg = ReplayConfig(
        checkpoint=args.policy,
        k=args.k,
        storage=args.storage,
        directory=args.directory,
        offload_adjoint=args.offload_adjoint,
    )
    higher_cfg = InnerConfig(optim=optim, batch_size=args.batch_size, backend="higher")
    replay_cfg = InnerConfig(optim=optim, batch_size=args.batch_size, backend="replay", replay=rcfg)
    rows = []
    for t in steps:
        data = make_data(tokenizer, t * args.batch_size, args.chars, seed=t).to(device)
        order = inner_order(len(data), args.batch_size, False, 0)
        eps = torch.ones(len(data), dtype=next(target.parameters()).dtype, device=device)
        replay_times: list[dict[str, float]] = []

        def sft(data=data, order=order, eps=eps):
            return run_sft(target, data, eps, phi, higher_cfg, order, create_graph=False)

        def higher(data=data, order=order):
            return metagradient_rewards(target, data, phi, higher_cfg, RankOrder(order))

        def replay(data=data, order=order, log=replay_times):
            out = metagradient_rewards(target, data, phi, replay_cfg, RankOrder(order))
            log.append(out.seconds)
            return out

        methods = {"sft": sft, "replay": replay}
        if t <= args.higher_limit[size]:
            methods["higher"] = higher
        runs: dict[str, list[Run]] = {name: [] for name in methods}
        for _ in range(repeats):
            for name, fn in methods.items():
                runs[name].append(measure(fn, device, memory))

        s, h, r = (fastest(runs, name) for name in ("sft", "higher", "replay"))
        split = replay_times[runs["replay"].index(r)]
        rel = None
        if h is not None:
            ref, rewards = h.out[0], r.out[0]
            rel = float((rewards - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        row = Row(
            size=size,
            steps=t,
            sft_cpu=s.cpu,
            sft_wall=s.wall,
            higher_cpu=h.cpu if h else None,
            higher_wall=h.wall if h else None,
            replay_cpu=r.cpu,
            replay_wall=r.wall,
            replay_fwd_share=split["inner_sft"] / (split["inner_sft"] + split["attribution"]),
            sft_peak=lowest_peak(runs, "sft"),
            higher_peak=lowest_peak(runs, "higher"),
            replay_peak=lowest_peak(runs, "replay"),
            rel_diff=rel,
            weight_bytes=weight_bytes,
        )
        rows.append(row)
        print(format_row(row), flush=True)
        del data, runs, s, h, r
        gc.collect()
    return rows


HEADER = (
    "| size | steps | SFT CPU s | higher/SFT | replay/SFT | replay fwd/SFT | replay rev/SFT "
    "| wall: higher/SFT | wall: replay/SFT | peak MiB SFT | peak MiB higher "
    "| peak MiB replay | rel diff |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: Row) -> str:
    """A Markdown row; ratios are CPU-time ratios to plain SFT unless marked wall."""
    rel = "n/a" if r.rel_diff is None else f"{r.rel_diff:.1e}"
    fwd = r.replay_cpu * r.replay_fwd_share
    return (
        f"| {r.size} | {r.steps} | {r.sft_cpu:.3f} | {ratio(r.higher_cpu, r.sft_cpu)} "
        f"| {ratio(r.replay_cpu, r.sft_cpu)} | {ratio(fwd, r.sft_cpu)} "
        f"| {ratio(r.replay_cpu - fwd, r.sft_cpu)} | {ratio(r.higher_wall, r.sft_wall)} "
        f"| {ratio(r.replay_wall, r.sft_wall)} | {mib(r.sft_peak)} | {mib(r.higher_peak)} "
        f"| {mib(r.replay_peak)} | {rel} |"
    )


def memory_summary(rows: list[Row]) -> list[str]:
    """Peak at the most steps over peak at the fewest, per size and backend.

    Two readings of "peak": the extra memory of the call alone, and the call's extra plus the
    target's own weights (what a GPU's ``max_memory_allocated`` shows for a process that holds
    only the target).
    """
    out = []
    for size in dict.fromkeys(r.size for r in rows):
        rs = [r for r in rows if r.size == size]
        first, last = rs[0], rs[-1]
        if first.replay_peak is None:
            continue
        hs = [r for r in rs if r.higher_peak is not None]
        h = (
            f"higher {ratio(hs[-1].higher_peak, hs[0].higher_peak)}x "
            f"({hs[0].steps} -> {hs[-1].steps} steps)"
            if len(hs) > 1
            else "higher n/a"
        )
        w = first.weight_bytes
        out.append(
            f"{size}: peak({last.steps} steps) / peak({first.steps} step): "
            f"replay {ratio(last.replay_peak, first.replay_peak)}x extra, "
            f"{ratio(last.replay_peak + w, first.replay_peak + w)}x with the weights "
            f"({mib(w)} MiB), {h}"
        )
        if len(rs) > 2 and rs[1].replay_peak:
            out.append(
                f"{size}: replay peak({last.steps}) / peak({rs[1].steps}): "
                f"{ratio(last.replay_peak, rs[1].replay_peak)}x extra"
            )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--size",
        default="tiny,gpt2",
        help=f"comma-separated sizes among {', '.join(SIZES)} (gpt2 = GPT-2 124M shape)",
    )
    p.add_argument(
        "--steps",
        default=None,
        help="comma-separated inner steps (default: tiny/small 1,4,16,64; gpt2 1,2)",
    )
    p.add_argument("--optim", choices=["sgd", "adam", "adamw"], default="adam")
    p.add_argument(
        "--phi",
        choices=["head_norm", "loss"],
        default="head_norm",
        help="metric: -||W_lmhead|| or -held-out loss (dense adjoint already at 1 step)",
    )
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--chars", type=int, default=30, help="bytes per example (tokens = chars + 2)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--policy", choices=["every", "every_k", "sqrt"], default="every")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--storage", choices=["cpu", "disk"], default="disk")
    p.add_argument("--directory", default=None, help="replay checkpoint dir (default: temp)")
    p.add_argument(
        "--offload-adjoint",
        action="store_true",
        help="inner.replay.offload_adjoint: the carried adjoint waits in --storage between steps",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default tiny 3, gpt2 2)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: stable under a shared CPU)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--higher-max-steps",
        type=int,
        default=None,
        help="skip `higher` above this many steps (its memory grows linearly; default: "
        "tiny no limit, small 16, gpt2 2)",
    )
    p.add_argument(
        "--measure",
        choices=["time", "memory", "both"],
        default="both",
        help="both: times here, CPU peaks in a child process with a freeing allocator",
    )
    p.add_argument("--json-out", default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    args.sizes = args.size.split(",")
    for size in args.sizes:
        if size not in SIZES:
            p.error(f"--size {size}: choose among {', '.join(SIZES)}")
    limit = args.higher_max_steps
    defaults = {"tiny": 10**9, "small": 16, "gpt2": 2}
    args.higher_limit = {k: v if limit is None else limit for k, v in defaults.items()}
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cpu_memory = args.device == "cpu" and args.measure in ("memory", "both")
    if cpu_memory and args.measure == "memory":
        # glibc must be told before the first allocation: re-execute with the settings.
        reexec_with_malloc_env("benchmarks.metagrad_cost", argv)
    torch.set_num_threads(args.threads)
    print(
        f"{machine_line(args.device, args.threads)}, "
        f"replay {args.policy}/{args.storage}"
        f"{', adjoint offloaded' if args.offload_adjoint else ''}, measure {args.measure}"
    )
    if cpu_memory and args.measure == "both":
        args.measure = "time"
    rows = []
    for size in args.sizes:
        default = [1, 2] if size == "gpt2" else [1, 4, 16, 64]
        steps = [int(s) for s in args.steps.split(",")] if args.steps else default
        rows += run_size(args, size, steps)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump([asdict(r) for r in rows], f)
    if cpu_memory and args.measure == "time":
        print("\nmeasuring peak memory in a child process ...", flush=True)
        child = memory_in_child("benchmarks.metagrad_cost", argv)
        peaks = {(r["size"], r["steps"]): r for r in child}
        for r in rows:
            m = peaks[r.size, r.steps]
            r.sft_peak, r.higher_peak, r.replay_peak = (
                m["sft_peak"],
                m["higher_peak"],
                m["replay_peak"],
            )
    print("\n" + HEADER)
    for r in rows:
        print(format_row(r))
    print()
    for line in memory_summary(rows):
        print(line)


if __name__ == "__main__":
    main()
