"""Cost of the DPG metagradient relative to plain SFT, and its peak memory vs inner steps.

Measured side by side in one process, on the same target, data and inner steps:

* ``sft``: plain SFT of T steps (``run_sft(create_graph=False)``), the unit of cost;
* ``higher``: the default backend (whole unrolled SFT on the tape, then one backward);
* ``replay``: the step-wise backend (graph-free forward with checkpoints, then one step's graph
  at a time backwards), checkpoint policy and storage from the flags.

Methods run interleaved ``--repeats`` times and each keeps its fastest run (the box may be
shared: the fastest is the least disturbed). Times are reported as ratios to ``sft``, which are
far more stable under contention than seconds, and as CPU time (``time.process_time``, one
intra-op thread by default) as well as wall time: CPU time does not count the time spent waiting
for a core that other jobs hold. The replay forward/reverse split is its wall-time split
applied to its CPU time. Peak memory is the extra memory of one call above what was live before
it: on CUDA ``torch.cuda.max_memory_allocated`` (exact, tensors only); on CPU the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) minus its resident set before
the call. For the CPU number to track tensor memory, peaks are measured in a child process
started with glibc's ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` set so that freed
tensor buffers go back to the OS instead of staying in the heap (times are measured here, with
the normal allocator, since returning every buffer costs page faults); small-model peaks (a few
MiB) are still within allocator noise, so read memory ratios on the ``gpt2`` size.

Usage::

    python benchmarks/metagrad_cost.py                         # tiny 1,4,16,64 + gpt2 1,2
    python benchmarks/metagrad_cost.py --size small --storage cpu
    python benchmarks/metagrad_cost.py --size gpt2 --steps 1,4,16,64,96 --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from dpg_lightning.inner import (
    InnerConfig,
    inner_order,
    metagradient_rewards,
    per_example_loss,
    run_sft,
    tokenize_examples,
)
from dpg_lightning.models import ModelConfig, build_model, load_tokenizer
from dpg_lightning.objectives import LMHeadL2Norm
from dpg_lightning.optim import InnerOptimConfig
from dpg_lightning.replay import ReplayConfig

SIZES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
    # Between the two: big enough that peak memory stands clear of allocator noise, small
    # enough for 64 inner steps on a CPU.
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
    # GPT-2 124M shape, random weights, built from config (no download).
    "gpt2": dict(
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        max_position_embeddings=1024,
    ),
}
GPT2_VOCAB = 50257
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


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


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Run:
    """One call's CPU seconds, wall seconds, peak extra bytes (or None) and result."""

    cpu: float
    wall: float
    peak: int | None
    out: object


def measure(fn: Callable[[], object], device: torch.device, memory: bool) -> Run:
    """Run ``fn`` once; with ``memory``, also its peak above the memory live before it.

    CPU time (``time.process_time``) is the headline on a shared CPU: with one intra-op thread
    it counts this process's work and not the time it waited for a core, which wall time does.
    """
    gc.collect()
    before = None
    if memory and device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    elif memory:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            before = _status("VmRSS")
        except OSError:
            before = None
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak = None
    if before is not None and device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    elif before is not None:
        hwm = _status("VmHWM")
        peak = None if hwm is None else hwm - before
    return Run(cpu, wall, peak, out)


class HeldOutLoss:
    """``Phi = -mean token loss`` on a fixed batch: depends on every parameter of the target."""

    def __init__(self, ids: Tensor, mask: Tensor, labels: Tensor) -> None:
        self.ids, self.mask, self.labels = ids, mask, labels

    def __call__(self, target: nn.Module) -> Tensor:
        logits = target(self.ids, attention_mask=self.mask).logits
        return -per_example_loss(logits.float(), self.labels).mean()


def make_phi(name: str, tokenizer, chars: int, device: torch.device):
    """``head_norm``: ``-||W_lmhead||`` (reads the head only); ``loss``: :class:`HeldOutLoss`.

    The choice matters for memory at 1 inner step: the adjoint ``dPhi/dparams`` that the
    reverse pass carries is then only as dense as ``Phi``'s own gradient (one matrix for
    ``head_norm``), while from 2 steps on it is dense in every trained parameter whatever
    ``Phi`` is. ``loss`` makes the 1-step peak representative of longer loops.
    """
    if name == "head_norm":
        return LMHeadL2Norm()
    held = make_data(tokenizer, 4, chars, seed=10**6).to(device)
    return HeldOutLoss(held.input_ids, held.attention_mask, held.labels)


def make_data(tokenizer, n: int, chars: int, seed: int):
    """``n`` random lowercase strings of ``chars`` bytes (byte tokenizer: chars + 2 tokens)."""
    rng = random.Random(seed)
    letters = "abcdefghij klmnopqrstuvwxyz"
    texts = ["".join(rng.choice(letters) for _ in range(chars)) for _ in range(n)]
    return tokenize_examples(texts, tokenizer, chars + 2)


def _fastest(runs: dict[str, list[Run]], name: str) -> Run | None:
    return min(runs[name], key=lambda run: run.cpu) if name in runs else None


def _peak(runs: dict[str, list[Run]], name: str) -> int | None:
    peaks = [run.peak for run in runs.get(name, []) if run.peak is not None]
    return min(peaks) if peaks else None


def run_size(args: argparse.Namespace, size: str, steps: list[int]) -> list[Row]:
    """Measure every method at every step count on one target size.

    The methods run interleaved (sft, higher, replay, sft, higher, replay, ...) and each keeps
    its fastest run, so a burst of load from other jobs hits all three alike.
    """
    device = torch.device(args.device)
    memory = args.measure in ("memory", "both")
    mcfg = ModelConfig(arch="gpt2", dtype=args.dtype, **SIZES[size])
    tokenizer = load_tokenizer(mcfg)
    vocab = GPT2_VOCAB if size == "gpt2" else len(tokenizer)  # tiny/small: byte vocabulary
    target = build_model(mcfg, vocab).requires_grad_(False).to(device)
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
            metagradient_rewards(target, data, phi, warm, order)
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
            return metagradient_rewards(target, data, phi, higher_cfg, order)

        def replay(data=data, order=order, log=replay_times):
            times: dict[str, float] = {}
            out = metagradient_rewards(target, data, phi, replay_cfg, order, times)
            log.append(times)
            return out

        methods = {"sft": sft, "replay": replay}
        if t <= args.higher_limit[size]:
            methods["higher"] = higher
        runs: dict[str, list[Run]] = {name: [] for name in methods}
        for _ in range(repeats):
            for name, fn in methods.items():
                runs[name].append(measure(fn, device, memory))

        s, h, r = (_fastest(runs, name) for name in ("sft", "higher", "replay"))
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
            sft_peak=_peak(runs, "sft"),
            higher_peak=_peak(runs, "higher"),
            replay_peak=_peak(runs, "replay"),
            rel_diff=rel,
            weight_bytes=weight_bytes,
        )
        rows.append(row)
        print(format_row(row), flush=True)
        del data, runs, s, h, r
        gc.collect()
    return rows


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}"


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
        f"| {r.size} | {r.steps} | {r.sft_cpu:.3f} | {_ratio(r.higher_cpu, r.sft_cpu)} "
        f"| {_ratio(r.replay_cpu, r.sft_cpu)} | {_ratio(fwd, r.sft_cpu)} "
        f"| {_ratio(r.replay_cpu - fwd, r.sft_cpu)} | {_ratio(r.higher_wall, r.sft_wall)} "
        f"| {_ratio(r.replay_wall, r.sft_wall)} | {_mib(r.sft_peak)} | {_mib(r.higher_peak)} "
        f"| {_mib(r.replay_peak)} | {rel} |"
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
            f"higher {_ratio(hs[-1].higher_peak, hs[0].higher_peak)}x "
            f"({hs[0].steps} -> {hs[-1].steps} steps)"
            if len(hs) > 1
            else "higher n/a"
        )
        w = first.weight_bytes
        out.append(
            f"{size}: peak({last.steps} steps) / peak({first.steps} step): "
            f"replay {_ratio(last.replay_peak, first.replay_peak)}x extra, "
            f"{_ratio(last.replay_peak + w, first.replay_peak + w)}x with the weights "
            f"({_mib(w)} MiB), {h}"
        )
        if len(rs) > 2 and rs[1].replay_peak:
            out.append(
                f"{size}: replay peak({last.steps}) / peak({rs[1].steps}): "
                f"{_ratio(last.replay_peak, rs[1].replay_peak)}x extra"
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


def _memory_in_child(argv: list[str]) -> dict[tuple[str, int], dict]:
    """Peak memory measured in a child process with the glibc settings of ``MALLOC_ENV``.

    Timing runs in this process with the normal allocator (forcing every freed buffer back to
    the OS costs page faults and would inflate every time); memory runs in a child where freed
    buffers do go back, so its resident-set peak follows tensor memory.
    """
    gc.collect()
    try:  # hand the timing pass's freed heap back to the OS while the child runs
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "memory.json")
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--measure", "memory"]
        subprocess.run([*cmd, "--json-out", out], env={**os.environ, **MALLOC_ENV}, check=True)
        with open(out) as f:
            return {(r["size"], r["steps"]): r for r in json.load(f)}


def _without_measure(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--measure":
            skip = True
        elif not a.startswith("--measure="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cpu_memory = args.device == "cpu" and args.measure in ("memory", "both")
    if cpu_memory and args.measure == "memory":
        if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
            # glibc must be told before the first allocation: re-execute with the settings.
            script = [sys.executable, os.path.abspath(__file__), *argv]
            os.execve(sys.executable, script, {**os.environ, **MALLOC_ENV})
    torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    print(
        f"machine: {platform.node()} {cpu}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, device {args.device}, {args.threads} thread(s), "
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
        peaks = _memory_in_child(_without_measure(argv))
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
