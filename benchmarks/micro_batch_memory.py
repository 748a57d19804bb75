"""Peak memory of one ``replay`` metagradient against the inner batch, at a fixed micro-batch.

With ``inner.micro_batch_size`` the replay backend builds one micro-batch's graph at a time,
forward and reverse, so its peak should be set by the micro-batch, not the batch: a batch of
1024 in micro-batches of 128 should need about what a batch of 128 needs. This measures it:
one inner step (the synthetic set is one batch) per configuration, checkpoints on disk, peak
resident memory above the baseline in this process started with glibc told to hand freed
buffers back (``harness.MALLOC_ENV``), and the time.

Usage::

    python -m benchmarks.micro_batch_memory                          # small shape, 1024/128
    python -m benchmarks.micro_batch_memory --size gpt2 --chars 126 --pairs 128:128,1024:128
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial

import torch

from benchmarks.harness import (
    MALLOC_ENV,
    build_target,
    machine_line,
    make_data,
    make_phi,
    measure,
    mib,
    reexec_with_malloc_env,
)
from dpg_lightning.inner import (
    InnerConfig,
    InnerOptimConfig,
    RankOrder,
    ReplayConfig,
    inner_order,
    metagradient_rewards,
)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    reexec_with_malloc_env("benchmarks.micro_batch_memory", argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", help="harness.SIZES key")
    ap.add_argument("--chars", type=int, default=62, help="characters per example (+2 tokens)")
    ap.add_argument("--pairs", default="128:128,1024:128", help="batch:micro,... to measure")
    ap.add_argument("--optim", default="adamw", choices=["sgd", "adam", "adamw"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    target, tokenizer = build_target(args.size, device)
    optim = InnerOptimConfig(args.optim, lr=1e-4, betas=(0.9, 0.95), eps_root=1e-9,
                             weight_decay=1e-4)
    print(machine_line("cpu", args.threads), f"| malloc env {MALLOC_ENV}")
    print(f"target {args.size}: {sum(p.numel() for p in target.parameters()) / 1e6:.1f}M "
          f"parameters, {args.chars + 2} tokens per example, inner {args.optim}, one inner step,"
          " replay checkpoints on disk")
    print("| batch | micro-batch | micro-batches | peak extra MiB | CPU s |")
    print("| --- | --- | --- | --- | --- |")
    phi = make_phi("loss", tokenizer, args.chars, device)
    for pair in args.pairs.split(","):
        batch, micro = (int(x) for x in pair.split(":"))
        data = make_data(tokenizer, batch, args.chars, seed=0)
        order = inner_order(batch, batch, True, 0)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = InnerConfig(optim=optim, batch_size=batch, micro_batch_size=micro,
                              backend="replay",
                              replay=ReplayConfig(storage="disk", directory=tmp))
            run = measure(partial(metagradient_rewards, target, data, phi, cfg, RankOrder(order)),
                          device, memory=True)
        print(f"| {batch} | {micro} | {-(-batch // micro)} | {mib(run.peak)} | {run.cpu:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
