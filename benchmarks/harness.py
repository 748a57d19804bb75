"""The measuring harness the benchmark scripts share: targets, data, ``Phi``, one timed call.

The scripts import it as ``benchmarks.harness`` and run as modules from the repository root
(``python -m benchmarks.<script>``); child processes are started the same way
(:func:`module_command`).

Why the measurement is made this way. The box the numbers come from is usually a shared CPU:

* **CPU time, one intra-op thread.** ``time.process_time`` counts this process's work and not
  the time it waited for a core that other jobs hold, which wall time does; with one thread it
  is also not inflated by spinning workers. Wall time is kept alongside.
* **Fastest of interleaved repeats.** The methods of one comparison run in turn (a, b, c, a, b,
  c, ...) and each keeps its fastest run: a burst of load from other jobs hits them all alike,
  and the fastest run is the least disturbed. Report ratios between methods of one run, which are
  far steadier than seconds.
* **Peak memory as the extra above the baseline.** The peak of one call minus what was live
  before it: on CUDA ``torch.cuda.max_memory_allocated`` (exact, tensors only); on CPU the
  process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) minus its
  resident set before the call. For the CPU number to follow tensor memory, freed buffers must go
  back to the OS, so CPU peaks are measured in a child process started with glibc's
  ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` (:data:`MALLOC_ENV`) while times are
  measured in the parent with the normal allocator (returning every buffer costs page faults).
  Peaks of a few MiB are still within allocator noise.
"""

from __future__ import annotations

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
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpg_lightning.data.tokenization import TokenRows, tokenize_examples
from dpg_lightning.inner import per_example_loss
from dpg_lightning.metrics.l2_norm import LMHeadL2Norm
from dpg_lightning.models.build import ModelConfig, build_model, load_tokenizer

#: Target shapes (GPT-2 or Llama blocks, random weights built from config, no download).
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
#: glibc settings that hand freed buffers back to the OS, so the resident set follows tensors.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def build_target(size: str, device: torch.device, **model: object):
    """A frozen target of shape ``SIZES[size]`` on ``device`` and its tokenizer.

    ``model``: further :class:`ModelConfig` fields (``arch``, ``dtype``). ``gpt2`` gets GPT-2's
    vocabulary; ``tiny``/``small`` the byte tokenizer's.
    """
    mcfg = ModelConfig(**model, **SIZES[size])
    tokenizer = load_tokenizer(mcfg)
    vocab = GPT2_VOCAB if size == "gpt2" else len(tokenizer)
    return build_model(mcfg, vocab).requires_grad_(False).to(device), tokenizer


def _status(key: str) -> int | None:
    """``key`` (e.g. ``VmRSS``, ``VmHWM``) of ``/proc/self/status`` in bytes, or None."""
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


def fastest(runs: dict[str, list[Run]], name: str) -> Run | None:
    """The run of ``name`` with the least CPU time (None when ``name`` was not run)."""
    return min(runs[name], key=lambda run: run.cpu) if name in runs else None


def lowest_peak(runs: dict[str, list[Run]], name: str) -> int | None:
    """The lowest measured peak of ``name`` over its repeats (None when none was measured)."""
    peaks = [run.peak for run in runs.get(name, []) if run.peak is not None]
    return min(peaks) if peaks else None


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}"


class HeldOutLoss:
    """``Phi = -mean token loss`` on a fixed batch: depends on every parameter of the target."""

    def __init__(self, ids: Tensor, mask: Tensor, labels: Tensor) -> None:
        self.ids, self.mask, self.labels = ids, mask, labels

    def __call__(self, target: nn.Module) -> Tensor:
        logits = target(self.ids, attention_mask=self.mask).logits
        return -per_example_loss(logits.float(), self.labels).mean()


def make_data(tokenizer, n: int, chars: int, seed: int) -> TokenRows:
    """``n`` random lowercase strings of ``chars`` bytes (byte tokenizer: chars + 2 tokens)."""
    rng = random.Random(seed)
    letters = "abcdefghij klmnopqrstuvwxyz"
    texts = ["".join(rng.choice(letters) for _ in range(chars)) for _ in range(n)]
    return tokenize_examples(texts, tokenizer, chars + 2)


def held_out_loss(tokenizer, chars: int, seed: int, device: torch.device) -> HeldOutLoss:
    """:class:`HeldOutLoss` on 4 random strings of ``chars`` bytes."""
    held = make_data(tokenizer, 4, chars, seed=seed).to(device)
    return HeldOutLoss(held.input_ids, held.attention_mask, held.labels)


def make_phi(name: str, tokenizer, chars: int, device: torch.device):
    """``head_norm``: ``-||W_lmhead||`` (reads the head only); ``loss``: :class:`HeldOutLoss`.

    The choice matters for memory at 1 inner step: the adjoint ``dPhi/dparams`` that the
    reverse pass carries is then only as dense as ``Phi``'s own gradient (one matrix for
    ``head_norm``), while from 2 steps on it is dense in every trained parameter whatever
    ``Phi`` is. ``loss`` makes the 1-step peak representative of longer loops.
    """
    if name == "head_norm":
        return LMHeadL2Norm()
    return held_out_loss(tokenizer, chars, 10**6, device)


def machine_line(device: str, threads: int) -> str:
    """``machine: <host> <cpu>, <n> cores, torch <version>, device <d>, <t> thread(s)``."""
    return (
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, device {device}, "
        f"{threads} thread(s)"
    )


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_command(module: str) -> list[str]:
    """``python -m module``: how a benchmark starts a copy of itself (``module``: ``__spec__``'s
    name, e.g. ``benchmarks.knobs``)."""
    return [sys.executable, "-m", module]


def module_env(**extra: str) -> dict[str, str]:
    """This process's environment plus ``extra``, with the repository root first on
    ``PYTHONPATH`` so that ``python -m benchmarks.<name>`` resolves from any directory."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **extra, "PYTHONPATH": path}


def reexec_with_malloc_env(module: str, argv: list[str]) -> None:
    """Re-execute ``python -m module argv`` with :data:`MALLOC_ENV` unless it is already set.

    glibc reads these settings before the first allocation, so they cannot be set from inside.
    """
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        cmd = module_command(module)
        os.execve(cmd[0], [*cmd, *argv], module_env(**MALLOC_ENV))


def without_measure(argv: list[str]) -> list[str]:
    """``argv`` without its ``--measure X`` / ``--measure=X``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--measure":
            skip = True
        elif not a.startswith("--measure="):
            out.append(a)
    return out


def memory_in_child(module: str, argv: list[str]) -> list[dict]:
    """The rows of ``python -m module argv --measure memory``, run in a child with
    :data:`MALLOC_ENV`.

    Timing runs in this process with the normal allocator (forcing every freed buffer back to
    the OS costs page faults and would inflate every time); memory runs in a child where freed
    buffers do go back, so its resident-set peak follows tensor memory. The child writes its rows
    with ``--json-out``.
    """
    gc.collect()
    try:  # hand the timing pass's freed heap back to the OS while the child runs
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "memory.json")
        cmd = [*module_command(module), *without_measure(argv), "--measure", "memory"]
        subprocess.run([*cmd, "--json-out", out], env=module_env(**MALLOC_ENV), check=True)
        with open(out) as f:
            return json.load(f)
