"""How close is ``python -m dpg_lightning plan`` to real peaks? Measured on the CPU.

For each target shape it runs ONE ``replay`` metagradient with ``inner.micro_batch_size`` in a
child process (glibc told to hand freed buffers back to the OS, peak = resident-set high-water
mark minus the resident set before the call: ``harness.measure``, whose docstring says why) and
compares that peak with the planner's estimate of the same quantity: everything the inner SFT
adds above the target's weights on the device (:func:`dpg_lightning.planning.cost.inner_terms`:
optimizer moments, carried adjoint, HVP buffers, one micro-batch's double-backward graph).
Checkpoints go to disk (``storage: disk``), as they would leave a GPU, so they are not in the
resident set.

Targets are GPT-2 shaped with GPT-2's real vocabulary (50257), random weights, random token
ids fed straight to :func:`~dpg_lightning.inner.metagradient_rewards` as ``TokenRows`` (no
tokenizer), inner AdamW (``eps_root``), 2 inner steps of 2 micro-batches (the peak is a reverse
step's, the same from 2 steps on: ``benchmarks/README.md``), ``Phi`` = negative mean token loss
on one held-out row (dense adjoint in every weight).

``--terms`` instead re-derives the integer activation counts the model is built from
(``step_cost.FIRST_ORDER``, ``HVP_TURN``, ``LOGITS_HVP_TURN`` and the weight-sized buffers of a
reverse step) on tiny models in seconds: first-order counts from the tensors autograd saves in a
forward (``saved_tensors_hooks``), the HVP's turn from every allocation alive at the peak of a
tiny replay (``torch.profiler`` memory events), each at two depths so per-block counts separate
from the rest.

Usage::

    python -m benchmarks.plan_check                       # 256x4 micro 4, 512x6 micro 2
    python -m benchmarks.plan_check --shapes 256x4 --micro 8
    python -m benchmarks.plan_check --terms
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import tempfile

import torch

from benchmarks.harness import MALLOC_ENV, machine_line, measure, module_command, module_env
from dpg_lightning.data.tokenization import TokenRows
from dpg_lightning.inner import (
    InnerConfig,
    InnerOptimConfig,
    RankOrder,
    ReplayConfig,
    inner_order,
    metagradient_rewards,
    per_example_loss,
)
from dpg_lightning.models.build import ModelConfig, build_model
from dpg_lightning.planning.cost import (
    FIRST_ORDER,
    HVP_TURN,
    LOGITS_HVP_TURN,
    Inner,
    inner_terms,
)
from dpg_lightning.planning.shapes import ModelShape

VOCAB = 50257
STEPS = 2


def shape_of(spec: str, vocab: int = VOCAB) -> ModelShape:
    """``HIDDENxLAYERS`` as a GPT-2 shape (64-wide heads, MLP 4x, 1024 positions, tied)."""
    hidden, layers = (int(x) for x in spec.split("x"))
    heads = max(1, hidden // 64)
    return ModelShape("gpt2", vocab, hidden, layers, heads, heads, 4 * hidden, 1024, True, 4)


def build_target(shape: ModelShape, arch: str = "gpt2", positions: int | None = None):
    mcfg = ModelConfig(
        arch=arch, hidden_size=shape.hidden, num_layers=shape.layers, num_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=positions or shape.positions or 64,
        tie_word_embeddings=shape.tied,
    )
    return build_model(mcfg, shape.vocab).requires_grad_(False)


def random_rows(n: int, seq: int, vocab: int, gen: torch.Generator) -> TokenRows:
    """``n`` full rows of random token ids, every token but the first a label."""
    ids = torch.randint(0, vocab, (n, seq), generator=gen)
    labels = ids.clone()
    labels[:, 0] = -100
    return TokenRows(ids, torch.ones_like(ids), labels)


def replay_call(shape: ModelShape, micro: int, seq: int, directory: str, positions=None,
                chunks: int = 2, offload: bool = False, backend: str = "replay"):
    """The target and a zero-argument call running one replay metagradient on it
    (``STEPS`` inner steps of ``chunks`` micro-batches of ``micro`` rows)."""
    target = build_target(shape, positions=positions)
    gen = torch.Generator().manual_seed(0)
    data = random_rows(chunks * micro * STEPS, seq, shape.vocab, gen)
    held = random_rows(1, seq, shape.vocab, gen)

    def phi(model):
        logits = model(held.input_ids, attention_mask=held.attention_mask).logits
        return -per_example_loss(logits, held.labels).mean()

    cfg = InnerConfig(
        optim=InnerOptimConfig(name="adamw", lr=1e-5, betas=(0.9, 0.95), eps_root=1e-9,
                               weight_decay=1e-4),
        batch_size=chunks * micro, micro_batch_size=micro, backend=backend, max_length=seq,
        replay=ReplayConfig(storage="disk", directory=directory, offload_adjoint=offload),
    )
    order = inner_order(len(data), cfg.batch_size, True, 0)
    return target, lambda: metagradient_rewards(target, data, phi, cfg, RankOrder(order))


def predicted(shape: ModelShape, micro: int, seq: int, chunks: int = 2, offload: bool = False,
              backend: str = "replay") -> list[tuple[str, int]]:
    """The planner's itemised estimate of the same call's extra device memory."""
    inner = Inner(
        backend=backend, optim="adamw", momentum=0.0,
        trained_bytes=shape.params * shape.bytes_per_param, steps=STEPS,
        rows_per_step=chunks * micro, rows_total=chunks * micro * STEPS, micro_rows=micro,
        seq=seq, offload_adjoint=offload,
    )
    return inner_terms(shape, inner)


def child(spec: str, micro: int, seq: int, chunks: int, offload: bool, backend: str, out: str
          ) -> None:
    """Measure one call (in the freeing-allocator child) and write its row as JSON."""
    torch.set_num_threads(1)
    shape = shape_of(spec)
    with tempfile.TemporaryDirectory() as tmp:
        target, call = replay_call(shape, micro, seq, tmp, chunks=chunks, offload=offload,
                                   backend=backend)
        params = sum(p.numel() for p in target.parameters())
        run = measure(call, torch.device("cpu"), memory=True)
    row = dict(shape=spec, micro=micro, seq=seq, params=params, peak=run.peak, cpu=run.cpu,
               wall=run.wall)
    with open(out, "w") as f:
        json.dump(row, f)


def check(shapes: list[str], micros: list[int], seq: int, chunks: int, offload: bool,
          backend: str) -> None:
    print(machine_line("cpu", 1))
    print(f"backend {backend}, {STEPS} steps of {chunks} micro-batch(es), adjoint "
          f"{'offloaded' if offload else 'in memory'}")
    print("| shape (hidden x layers) | params | micro-batch x seq | predicted MiB | measured MiB "
          "| predicted / measured | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for spec, micro in zip(shapes, micros, strict=True):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "row.json")
            cmd = [*module_command("benchmarks.plan_check"), "--child", spec,
                   "--micro", str(micro), "--seq", str(seq), "--chunks", str(chunks),
                   "--backend", backend, "--json-out", out] + (["--offload"] if offload else [])
            subprocess.run(cmd, env=module_env(**MALLOC_ENV, OMP_NUM_THREADS="1"), check=True)
            with open(out) as f:
                row = json.load(f)
        shape = shape_of(spec)
        assert shape.params == row["params"], (shape.params, row["params"])
        terms = predicted(shape, micro, seq, chunks, offload, backend)
        guess = sum(b for _, b in terms)
        print(f"| {spec} | {row['params'] / 1e6:.1f} M | {micro} x {seq} | {guess / 2**20:.1f} | "
              f"{row['peak'] / 2**20:.1f} | {guess / row['peak']:.3f} | {row['cpu']:.0f} |")
        print("  terms: " + ", ".join(f"{k} {b / 2**20:.1f}" for k, b in terms), flush=True)


# ----------------------------------------------------------------------------- --terms


def _first_order(arch: str, layers: int) -> collections.Counter:
    """Non-parameter tensors a forward saves, by kind, on a tiny model of ``layers`` blocks."""
    b, s, h, a, f = 4, 40, 96, 3, 320
    shape = ModelShape(arch, 1000, h, layers, a, a, f, 64 if arch == "gpt2" else 0, True)
    model = build_target(shape, arch).requires_grad_(True)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 1000, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, attention_mask=torch.ones_like(ids))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kinds = {b * s * h * 4: "hidden", b * s * f * 4: "mlp", b * a * s * s * 4: "scores"}
    return collections.Counter(kinds[n] for k, n in saved.items() if k not in params and n in kinds)


def _hvp_turn(layers: int) -> tuple[collections.Counter, str]:
    """Allocations alive at the peak of a tiny replay, by kind, and the op running then."""
    from torch.profiler import ProfilerActivity, profile

    micro, seq, vocab = 4, 40, 8000
    shape = ModelShape("gpt2", vocab, 96, layers, 3, 3, 384, seq, True)
    with tempfile.TemporaryDirectory() as tmp:
        _, call = replay_call(shape, micro, seq, tmp, positions=seq)
        call()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    live: dict[int, int] = {}
    now = peak = peak_ts = 0
    best: dict[int, int] = {}
    for e in mem:
        addr, n = e["args"]["Addr"], e["args"]["Bytes"]
        if n > 0:
            live[addr] = n
        else:
            live.pop(addr, None)
        now += n
        if now > peak:
            peak, peak_ts, best = now, e["ts"], dict(live)
    ops = [e["name"] for e in events if e.get("ph") == "X" and "Backward" in e["name"]
           and e["ts"] <= peak_ts <= e["ts"] + e.get("dur", 0)]
    tok = micro * seq
    kinds = {tok * 96 * 4: "hidden", tok * 384 * 4: "mlp", micro * 3 * seq * seq * 4: "scores",
             tok * vocab * 4: "logits", micro * (seq - 1) * vocab * 4: "logits",
             vocab * 96 * 4: "weight copies (token embedding)"}
    return collections.Counter(kinds[n] for n in best.values() if n in kinds), ops[-1:]


def terms() -> None:
    for arch in ("gpt2", "llama"):
        one, two = _first_order(arch, 1), _first_order(arch, 2)
        per_block = {k: two[k] - one[k] for k in ("hidden", "mlp", "scores")}
        c = FIRST_ORDER[arch]
        print(f"first order, {arch}: per block {per_block} (model: hidden {c.hidden}, mlp "
              f"{c.mlp}, scores {c.scores}); after the blocks: hidden "
              f"{one['hidden'] - per_block['hidden']} (model {c.final})")
    two, op = _hvp_turn(2)
    three, _ = _hvp_turn(3)
    per_block = {k: three[k] - two[k] for k in ("hidden", "mlp", "scores")}
    c = HVP_TURN["gpt2"]
    print(f"HVP turn, gpt2 (peak inside {op}): per block {per_block} (model: hidden {c.hidden}, "
          f"mlp {c.mlp}, scores {c.scores}); after the blocks: hidden "
          f"{two['hidden'] - 2 * per_block['hidden']} (model {c.final}); logit-sized "
          f"{two['logits']} (model {LOGITS_HVP_TURN}); weight-sized "
          f"{two['weight copies (token embedding)']} (model: 2 moments + 3 adjoint + 2 HVP = 7)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="256x4,512x6", help="HIDDENxLAYERS, comma-separated")
    p.add_argument("--micro", default="4,2", help="micro-batch rows, one per shape (or one)")
    p.add_argument("--seq", type=int, default=128, help="tokens per row")
    p.add_argument("--chunks", type=int, default=2, help="micro-batches per inner step")
    p.add_argument("--offload", action="store_true", help="inner.replay.offload_adjoint: true")
    p.add_argument("--backend", default="replay", help="replay | higher | func")
    p.add_argument("--terms", action="store_true", help="re-derive the activation counts")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, int(args.micro), args.seq, args.chunks, args.offload, args.backend,
              args.json_out)
        return
    torch.set_num_threads(1)
    if args.terms:
        terms()
        return
    shapes = args.shapes.split(",")
    micros = [int(m) for m in args.micro.split(",")]
    micros = micros * len(shapes) if len(micros) == 1 else micros
    check(shapes, micros, args.seq, args.chunks, args.offload, args.backend)


if __name__ == "__main__":
    main()
