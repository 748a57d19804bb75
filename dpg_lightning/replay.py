"""``replay``: the exact DPG metagradient in memory that does not grow with the inner steps.

The ``higher``/``func`` backends keep the whole unrolled SFT on the autograd tape, so memory
grows linearly with inner steps and long inner loops (e.g. 96 Adam steps on a GPT-2 target) do
not fit. This backend computes the very same ``r_i = dPhi/deps_i`` by reverse-mode
differentiation *one step at a time*:

1. Forward: plain SFT with no graph kept across steps, saving (trainable parameters, optimizer
   state) before some steps (the checkpoint policy) to CPU memory or to disk.
2. ``dPhi/dparams`` at the trained parameters (the adjoint of the last state).
3. Reverse: for t = T-1 .. 0, reload (or recompute from the nearest earlier checkpoint) the state
   before step t, rebuild *that step's* gradient ``g`` with its graph (``functional_call`` +
   ``autograd.grad(create_graph=True)``), and pull the adjoint of (parameters, Adam moments /
   SGD momentum) back through the step: through the optimizer update in closed form
   (:func:`~dpg_lightning.optim.update_vjp`, one parameter at a time), then through ``g`` with
   one backward seeded with ``dPhi/dg`` (a Hessian-vector product). That backward also yields
   ``dPhi/deps`` for the examples of that step's batch, since ``eps`` is a leaf of the local
   graph.

The step loss, per-example loss, parameter selection, forward update and metric wrapper are
imported from :mod:`dpg_lightning.inner`, :mod:`dpg_lightning.optim` and
:mod:`dpg_lightning.objectives`. The one piece of math written for this backend is the update's
derivative: autograd through the Adam update built a dozen weight-sized intermediates per step
and took two thirds of a reverse step on a GPT-2-124M target (``benchmarks/README.md``); the
closed form is held to autograd at 1e-12 in float64 (``tests/test_optim.py``), and the whole
backend to ``higher`` at 1e-6 and to finite differences (``tests/test_replay.py``).

**One working copy of the weights: the target's own.** Both passes update the target's trainable
parameters *in place* (:func:`~dpg_lightning.optim.optimizer_step_`, bit for bit the functional
step) and reload saved states into them, so no second set of weights ever exists on the device: the
forward step holds the weights and their gradient, never the old and the new weights at once,
and a reverse step replays step t in the same tensors that held step t+1. Without this every
step but the first would need one weight-sized buffer more than the first (the state it
reloads), which is 475 MiB on a GPT-2-124M target. The price: the state before step 0 is saved
like any other, and the target is restored from it bit for bit when the call returns or fails.

**The adjoint travels as fetchers.** The reverse step fetches each parameter's part of the
adjoint it carries only when it differentiates that parameter's update, and hands each part of
the new adjoint on as soon as it is final (a moment's right there, a parameter's after the
Hessian-vector product). With ``inner.replay.offload_adjoint`` the parts wait in the checkpoint
storage between steps, so the peak holds no carried adjoint: with Adam that is three weight
copies, two of them (the moments') absent from a 1-step run, which made longer runs' peaks
1.2x a 1-step run's.

Checkpointing is done at the level of whole inner steps, never with transformers' gradient
checkpointing: that recompute runs after ``functional_call`` has restored the module's own
parameters and silently differentiates the wrong weights.

:mod:`dpg_lightning.inner` imports :class:`ReplayConfig` from here at import time, so this module
imports ``inner`` lazily (inside functions) to avoid an import cycle.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from dpg_lightning.objectives import MetricOnTarget
from dpg_lightning.optim import (
    OptimState,
    init_state,
    optimizer_step_,
    update_vjp,
    used_slots,
)

if TYPE_CHECKING:
    from dpg_lightning.inner import InnerConfig, SFTData

Phi = Callable[[nn.Module], Tensor]


@dataclass
class ReplayConfig:
    """Settings of the ``replay`` backend (``inner.replay`` in the YAML).

    Attributes:
        checkpoint: which states the forward pass saves. ``every``: before every step (T saved
            states, no recompute); ``every_k``: before every ``k``-th step (T/k saved, each
            segment recomputed once in the reverse pass and buffered in CPU memory); ``sqrt``:
            ``every_k`` with ``k = ceil(sqrt(T))``, the classic sqrt(T) memory / one extra
            forward trade-off.
        k: segment length for ``every_k``.
        storage: ``cpu`` (host memory) or ``disk`` (files under ``directory``, deleted after the
            run); ``disk`` keeps host memory flat in T.
        directory: parent directory of the checkpoint files for ``disk`` (a fresh sub-directory
            is made per run); ``None`` uses the system temp directory.
        offload_adjoint: keep the adjoint the reverse pass carries from step to step (dPhi with
            respect to the weights and the optimizer moments: three weight copies with Adam) in
            ``storage`` between steps, and read each parameter's part back only when the
            backward through that parameter's update reaches it. Peak memory then holds about
            what a 1-step run holds, whatever the optimizer, for one write and one read of the
            adjoint per step. It helps where ``storage`` is not the memory the weights live in:
            ``disk``, or ``cpu`` with the target on an accelerator.
    """

    checkpoint: Literal["every", "every_k", "sqrt"] = "every"
    k: int = 4
    storage: Literal["cpu", "disk"] = "cpu"
    directory: str | None = None
    offload_adjoint: bool = False


def checkpoint_steps(cfg: ReplayConfig, n_steps: int) -> list[int]:
    """Steps ``t`` (0-based) before which the forward pass saves the training state."""
    if n_steps < 1:
        raise ValueError(f"the inner SFT has {n_steps} steps; replay needs at least one")
    if cfg.checkpoint == "every":
        k = 1
    elif cfg.checkpoint == "every_k":
        if cfg.k < 1:
            raise ValueError(f"`inner.replay.k` is {cfg.k}; it must be >= 1")
        k = cfg.k
    elif cfg.checkpoint == "sqrt":
        k = max(1, math.ceil(math.sqrt(n_steps)))
    else:
        raise ValueError(
            f"`inner.replay.checkpoint: {cfg.checkpoint}` is unknown; use every, every_k or sqrt"
        )
    return list(range(0, n_steps, k))


def _human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} TiB"


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_replay_storage(cfg: InnerConfig, target: nn.Module, n_steps: int) -> int:
    """Fail before any SFT work if the checkpoints cannot be stored; return their size in bytes.

    The estimate is (trainable parameters + active optimizer moments) x saved states, plus the
    CPU buffer of one recomputed segment for ``every_k``/``sqrt``. For ``disk`` the directory
    must be creatable, writable and have that much free space; for ``cpu`` the host must have
    that much available memory. A run that dies at step 90 of 96 for lack of space wastes the
    whole forward pass, hence the check up front.
    """
    from dpg_lightning.inner import trainable_names

    rcfg = cfg.replay
    saved = checkpoint_steps(rcfg, n_steps)
    named = dict(target.named_parameters())
    chosen = [named[n] for n in trainable_names(target, cfg.train_params)]
    param_bytes = sum(p.numel() * p.element_size() for p in chosen)
    per_state = param_bytes * (1 + sum(used_slots(cfg.optim)))
    segment = saved[1] - saved[0] if len(saved) > 1 else n_steps
    # An offloaded adjoint has the shape of a state: one is read while the next is written.
    stored = per_state * (len(saved) + 2 * int(rcfg.offload_adjoint))
    buffered = per_state * (segment - 1)
    what = (
        f"{len(saved)} checkpoint(s) of {_human(per_state)} (trainable parameters + "
        f"{cfg.optim.name} state) for {n_steps} inner steps, policy `{rcfg.checkpoint}`"
    )
    if rcfg.storage == "disk":
        directory = rcfg.directory or tempfile.gettempdir()
        try:
            os.makedirs(directory, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".dpg_replay_probe_"):
                pass
        except OSError as err:
            raise ValueError(
                f"`inner.replay.directory: {directory}` is not writable ({err}); the replay "
                f"backend needs about {_human(stored)} there for {what}. Choose a writable "
                "directory or `inner.replay.storage: cpu`"
            ) from err
        free = shutil.disk_usage(directory).free
        needed = int(stored * 1.01) + 65536  # raw files: tensor bytes only, plus a margin
        if free < needed:
            raise ValueError(
                f"`inner.replay.directory: {directory}` has {_human(free)} free but the replay "
                f"backend needs about {_human(needed)} for {what}. Free space, choose another "
                "directory, or save fewer states (`inner.replay.checkpoint: sqrt`)"
            )
        host = buffered  # the recompute buffer of one segment lives in host memory
    elif rcfg.storage == "cpu":
        host = stored + buffered
    else:
        raise ValueError(f"`inner.replay.storage: {rcfg.storage}` is unknown; use cpu or disk")
    available = _mem_available()
    if host and available is not None and host > available:
        raise ValueError(
            f"the replay backend needs about {_human(host)} of host memory for {what} "
            f"(+ a recompute buffer of {segment - 1} state(s)) but only {_human(available)} is "
            "available. Use `inner.replay.storage: disk` or `inner.replay.checkpoint: sqrt`"
        )
    return stored + buffered


# The adjoint the reverse pass carries: d Phi / d (parameters, first moments, second moments),
# one entry per trainable parameter (None where nothing depends on it or the slot is unused),
# each a one-shot fetcher (:class:`_Held`, :class:`_OnDisk`) that the backward calls.
Fetch = Callable[[], Tensor]
Carried = tuple[list[Fetch | None], list[Fetch | None], list[Fetch | None]]
# Turns a finished part of an adjoint into its fetcher (held in memory or offloaded).
Keep = Callable[[Tensor], Fetch]


class _Store:
    """Saved training states keyed by step, in host memory or in a private directory on disk.

    On disk a state is one raw file: its tensors' bytes back to back, written from and read
    back into the working tensors' own memory (no pickling; a staging copy only per tensor and
    only for accelerator tensors), with shapes and dtypes kept here. ``torch.save`` of hundreds
    of small tensors cost more than the SFT step on small models.
    """

    def __init__(self, cfg: ReplayConfig, slots: tuple[bool, bool]) -> None:
        self.slots = slots
        self.memory: dict[int, dict] = {}
        self.steps: dict[int, int] = {}
        self.directory: str | None = None
        self._pending: list[Future] = []
        self._adjoint_files: list[str] = []
        self._adjoints = 0
        if cfg.storage == "disk":
            self.directory = tempfile.mkdtemp(prefix="dpg_replay_", dir=cfg.directory or None)
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpg_replay")

    def _path(self, t: int) -> str:
        return os.path.join(self.directory, f"state_{t:06d}.bin")

    def put(self, t: int, params: list[Tensor], state: OptimState) -> None:
        """Save the state before step ``t`` (a copy: the working tensors change in place).

        On disk the file is written by a background thread, so the write overlaps the next
        gradient computation, which only reads the tensors; :meth:`wait` must return before
        anything overwrites them. Accelerator tensors are copied to host memory first.
        """
        if self.directory is None:
            self.memory[t] = _pack(params, state, self.slots)
            return
        self.wait()
        tensors = [x.to("cpu") for x in _tensors(params, state, self.slots)]  # self on CPU
        self.steps[t] = state.step
        self._pending.append(self._writer.submit(_write, self._path(t), tensors))

    def wait(self) -> None:
        """Block until every write submitted so far is on disk (re-raising its error, if any)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def prefetch(self, t: int) -> None:
        """Ask the OS to start reading the state before step ``t`` into its page cache, so that
        the later :meth:`load` copies from memory instead of waiting on the disk."""
        if self.directory is None or t not in self.steps or not hasattr(os, "posix_fadvise"):
            return
        fd = os.open(self._path(t), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def load(
        self, t: int, params: list[Tensor], state: OptimState, keep: bool = False
    ) -> OptimState:
        """Copy the state before step ``t`` into the working ``params``/``state`` (in place);
        returns the state with its step count. ``keep`` leaves the saved copy in the store."""
        if self.directory is None:
            payload = self.memory[t] if keep else self.memory.pop(t)
            return _copy_into(payload, params, state, self.slots)
        self.wait()
        path = self._path(t)
        with open(path, "rb", buffering=0) as f:
            for x in _tensors(params, state, self.slots):
                _read_into(f, x, path)
        if not keep:
            os.remove(path)
        step = self.steps[t] if keep else self.steps.pop(t)
        return OptimState(step, state.exp_avg, state.exp_avg_sq)

    def start_adjoint(self) -> Keep:
        """Begin offloading a new adjoint; returns the function that offloads one part of it
        (a parameter's or a moment's adjoint) and gives back its one-shot fetcher.

        In host memory a part becomes a host copy (the same tensor for a CPU target). On disk
        parts are appended to one file by the background writer as autograd finishes them;
        the file before the previous one is deleted (the previous one holds the adjoint that
        the current reverse step is still reading).
        """
        if self.directory is None:
            return lambda x: _Held(x.to("cpu"), x.device)
        self.wait()
        for old in self._adjoint_files[:-1]:
            os.remove(old)
        self._adjoints += 1
        path = os.path.join(self.directory, f"adjoint_{self._adjoints:06d}.bin")
        self._adjoint_files = self._adjoint_files[-1:] + [path]
        offset = 0

        def keep(x: Tensor) -> _OnDisk:
            nonlocal offset
            future = self._writer.submit(_write, path, [x.to("cpu")], "ab")
            self._pending.append(future)
            fetcher = _OnDisk(future, path, offset, x)
            offset += x.numel() * x.element_size()
            return fetcher

        return keep

    def close(self) -> None:
        self.memory.clear()
        if self.directory is not None:
            self._writer.shutdown(wait=True)  # a write still running must not outlive the files
            shutil.rmtree(self.directory, ignore_errors=True)


class _Held:
    """One part of the adjoint, handed to the backward once: afterwards nothing here keeps it,
    so its memory is freed as soon as autograd has used it (``device``: where it is needed)."""

    def __init__(self, x: Tensor, device: torch.device) -> None:
        self.x: Tensor | None = x
        self.device = device

    def __call__(self) -> Tensor:
        x, self.x = self.x, None
        return x.to(self.device)


class _OnDisk:
    """One part of an offloaded adjoint: ``offset`` bytes into ``path`` once ``written`` (the
    background write's future) is done; read when fetched."""

    def __init__(self, written: Future, path: str, offset: int, like: Tensor) -> None:
        self.written, self.path, self.offset = written, path, offset
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device

    def __call__(self) -> Tensor:
        self.written.result()
        x = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            _read_into(f, x, self.path)
        return x


def _in_memory(x: Tensor) -> _Held:
    """The :data:`Keep` that leaves a part of the adjoint where it is."""
    return _Held(x, x.device)


class _Contract(torch.autograd.Function):
    """``<x, seed>`` as a root of the backward, for its gradient only: it seeds ``x``'s graph
    with ``seed`` while keeping neither ``x`` (a gradient whose graph is all that is still
    needed: holding every ``g`` would be one more weight copy through the backward) nor, once
    used, the seed (fetched when the backward reaches it). The backward of the sum of these
    roots runs with the default seed 1, which sums pass on unchanged, so the seed is used as
    fetched instead of multiplied by 1. The forward value is a placeholder zero.
    """

    @staticmethod
    def forward(ctx, x: Tensor, fetch: Fetch) -> Tensor:
        ctx.fetch = fetch
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, one: Tensor) -> tuple[Tensor, None]:
        fetch, ctx.fetch = ctx.fetch, None  # keep nothing once used
        return fetch(), None


def _write(path: str, tensors: list[Tensor], mode: str = "wb") -> None:
    """Write ``tensors`` back to back, then empty the list (handed over by the caller): once the
    write's future is done, this thread keeps no reference, so an offloaded buffer is free."""
    with open(path, mode) as f:
        for x in tensors:
            f.write(_bytes(x))
    tensors.clear()


def _tensors(params: list[Tensor], state: OptimState, slots: tuple[bool, bool]) -> list[Tensor]:
    """The tensors a state consists of, in file order (lists the update never reads dropped)."""
    out = list(params)
    if slots[0]:
        out += state.exp_avg
    if slots[1]:
        out += state.exp_avg_sq
    return out


def _bytes(x: Tensor):
    """A contiguous host tensor's memory as a writable byte buffer (numpy view, bf16 too)."""
    return x.detach().reshape(-1).view(torch.uint8).numpy()


def _read_into(f, x: Tensor, path: str) -> None:
    """Fill ``x`` from the file ``f``: straight into its memory when it is a contiguous host
    tensor, else through a host buffer of this one tensor."""
    direct = x.device.type == "cpu" and x.is_contiguous()
    host = x if direct else torch.empty(x.shape, dtype=x.dtype)
    view, done = memoryview(_bytes(host)), 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise RuntimeError(f"replay checkpoint {path} is truncated")
        done += got
    if not direct:
        with torch.no_grad():
            x.copy_(host)


def _pack(params: list[Tensor], state: OptimState, slots: tuple[bool, bool]) -> dict:
    """A host copy of a state (lists the update never reads, always zero, left out)."""
    copies = [x.detach().to("cpu", copy=True) for x in _tensors(params, state, slots)]
    return {"step": state.step, "tensors": copies}


@torch.no_grad()
def _copy_into(
    payload: dict, params: list[Tensor], state: OptimState, slots: tuple[bool, bool]
) -> OptimState:
    """Copy a :func:`_pack` payload into the working tensors; returns the loaded state."""
    for src, x in zip(payload["tensors"], _tensors(params, state, slots), strict=True):
        x.copy_(src)
    return OptimState(payload["step"], state.exp_avg, state.exp_avg_sq)


def _forward_fn(target: nn.Module, names: list[str], params: list[Tensor]):
    # Names come from named_parameters(), which lists a tied weight once; functional_call's
    # default tie_weights=True then swaps it into every tied slot (as inner._func_sft does).
    current = dict(zip(names, params, strict=True))

    def forward(ids: Tensor, mask: Tensor):
        return torch.func.functional_call(target, current, (ids,), {"attention_mask": mask})

    return forward


def _plain_step(target, data, eps, idx, params, state, names, optim, wait=None):
    """One graph-free SFT step, applied in place to ``params`` and ``state``'s moments.

    The update is :func:`~dpg_lightning.optim.optimizer_step_`, bit for bit the functional
    step that the reverse pass differentiates, without a second set of weights. ``wait`` (if
    given) runs between the gradient and the update: a background save of the state being
    overwritten must be done by then. Returns ``(state, loss)``: the same tensors, step + 1.
    """
    from dpg_lightning.inner import _batch_loss

    leaves = [p.detach().requires_grad_() for p in params]
    loss = _batch_loss(_forward_fn(target, names, leaves), data, idx, eps)
    grads = list(torch.autograd.grad(loss, leaves, allow_unused=True))
    del leaves
    if wait is not None:
        wait()
    return optimizer_step_([p.detach() for p in params], grads, state, optim), loss.detach()


def _reverse_step(
    target, data, idx, params, state, names, optim, slots, box, eps_like, first, keep
):
    """Pull the adjoint (dPhi/dparams, dPhi/dm, dPhi/dv) after step back to before it.

    Rebuilds only this step's graph, the parameter gradient ``g`` with ``create_graph``; the
    update itself is differentiated in closed form (:func:`~dpg_lightning.optim.update_vjp`),
    one parameter at a time, which gives the moments' adjoints, the explicit part of the
    parameters' adjoint and ``dPhi/dg``. One backward from ``g`` with ``dPhi/dg`` as its seed
    (a Hessian-vector product, rooted in :class:`_Contract` nodes) then adds the rest to the
    parameters' adjoint and gives ``dPhi/deps`` for this step's examples, ``eps`` being a leaf
    of the local graph.

    The adjoint comes in ``box`` (a one-item list, emptied here) as one-shot fetchers
    (:data:`Carried`) so that the caller holds no reference to it; each parameter's part is
    fetched when that parameter's update is differentiated and released right after. The new
    adjoint's parts go to ``keep`` as soon as they are final: the moments' and the explicit
    parts in that same loop, each parameter's whole adjoint when the backward reaches it
    (:func:`_finish`).
    Returns ``(adjoint_before, dPhi/deps)``. For the ``first`` step the adjoint of the initial
    state is never used, so only ``dPhi/deps`` is computed. ``params``/``state`` are only read
    (the graph is gone when this returns, so the caller may then overwrite them).
    """
    from dpg_lightning.inner import _batch_loss

    adj_p, adj_m, adj_v = box.pop()
    n = len(params)
    p_in = [p.detach().requires_grad_() for p in params]
    eps = torch.ones_like(eps_like, requires_grad=True)
    loss = _batch_loss(_forward_fn(target, names, p_in), data, idx, eps)
    grads = list(torch.autograd.grad(loss, p_in, create_graph=True, allow_unused=True))
    del loss
    before: Carried = ([None] * n, [None] * n, [None] * n)
    explicit: list[Fetch | None] = [None] * n  # the parameters' adjoint, but for the HVP
    total = None  # sum of <g, dPhi/dg>: the root of the Hessian-vector product
    for j in range(n):
        fetched = [None if f is None else f() for f in (adj_p[j], adj_m[j], adj_v[j])]
        adj_p[j] = adj_m[j] = adj_v[j] = None
        g, grads[j] = grads[j], None
        if all(a is None for a in fetched):
            continue  # nothing after this step depends on this parameter
        if g is None:  # not in this step's loss: the update left it and its moments as they were
            if not first:
                for part, a in zip(before, fetched, strict=True):
                    part[j] = None if a is None else keep(a)
            continue
        m = state.exp_avg[j] if slots[0] else None
        v = state.exp_avg_sq[j] if slots[1] else None
        dp, dg, dm, dv = update_vjp(
            p_in[j].detach(), g.detach(), m, v, state.step + 1, optim, tuple(fetched)
        )
        del fetched
        if not first:  # each part goes at once (offloaded, it is freed once written)
            explicit[j] = None if dp is None else keep(dp)
            dp = None
            before[1][j] = None if dm is None else keep(dm)
            dm = None
            before[2][j] = None if dv is None else keep(dv)
        del dp, dm, dv
        if g.requires_grad:
            term = _Contract.apply(g, _in_memory(dg))
            total = term if total is None else total + term
        del g, dg
    del adj_p, adj_m, adj_v, grads
    hooks = [] if first else [
        p.register_post_accumulate_grad_hook(partial(_finish, before[0], explicit, j, keep))
        for j, p in enumerate(p_in)
    ]
    if total is not None:
        torch.autograd.backward(total, inputs=[eps] if first else p_in + [eps])
    del total
    for hook in hooks:
        hook.remove()
    for j, rest in enumerate(explicit):  # parameters the Hessian-vector product did not reach
        if rest is not None:
            before[0][j] = keep(rest())
    return before, eps.grad


def _finish(out: list, explicit: list, j: int, keep: Keep, leaf: Tensor) -> None:
    """Post-accumulate hook of parameter ``j``: once the Hessian-vector product has reached it,
    its adjoint is final: add the explicit part and hand it on at once, so that the
    parameters' new adjoint is never whole in memory while the backward runs."""
    grad, leaf.grad = leaf.grad, None
    rest, explicit[j] = explicit[j], None
    out[j] = keep(grad if rest is None else rest().add_(grad))


def replay_rewards(
    target: nn.Module,
    data: SFTData,
    phi: Phi,
    cfg: InnerConfig,
    order: list[Tensor],
    times: dict[str, float] | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """DPG rewards ``r_i = dPhi/deps_i`` at ``eps = 1`` by step-wise replay.

    Same signature and result as :func:`dpg_lightning.inner.metagradient_rewards` (which
    dispatches here for ``inner.backend: replay``): ``(rewards, Phi, losses)``, with ``times``
    receiving ``inner_sft`` (forward SFT + checkpointing) and ``attribution`` (reverse pass,
    including recomputation between checkpoints). The target's trainable parameters are the
    working copy (see the module docstring) and hold their original values again on return,
    also when the call raises.
    """
    from dpg_lightning.inner import trainable_names

    start = time.perf_counter()
    n_steps = len(order)
    check_replay_storage(cfg, target, n_steps)
    rcfg, optim = cfg.replay, cfg.optim
    slots = used_slots(optim)
    saved = checkpoint_steps(rcfg, n_steps)
    names = trainable_names(target, cfg.train_params)
    dtype = next(target.parameters()).dtype
    if not dtype.is_floating_point or dtype.itemsize < 4:
        dtype = torch.float32
    ones = torch.ones(len(data), dtype=dtype, device=data.input_ids.device)

    named = dict(target.named_parameters())
    work = [named[n] for n in names]  # updated in place; restored from state 0 at the end
    state = init_state([p.detach() for p in work], optim)
    store = _Store(rcfg, slots)
    modified = False

    def before_update() -> None:
        # The save of the state about to be overwritten must be complete (state 0 included:
        # it restores the target), and from here on the target's weights need restoring.
        nonlocal modified
        store.wait()
        modified = True

    try:
        with torch.enable_grad():
            losses = []
            for t, idx in enumerate(order):
                if t in saved:
                    store.put(t, work, state)
                state, loss = _plain_step(
                    target, data, ones, idx, work, state, names, optim, before_update
                )
                losses.append(loss)

            final = [p.detach().requires_grad_() for p in work]
            value = torch.func.functional_call(
                MetricOnTarget(target, phi),
                {f"target.{n}": p for n, p in zip(names, final, strict=True)},
                (),
            )
            adj_p = list(torch.autograd.grad(value, final, allow_unused=True))
            # ``value``'s graph ends in the leaves ``final``: detach it, or it keeps the
            # (in-place updated) weights' version and graph alive through the reverse pass.
            value = value.detach()
            del final
            middle = time.perf_counter()

            # The adjoint lives only in ``adjoint`` (rebound every step): a second name for
            # the first one would keep a parameter-sized copy alive through the whole pass.
            new_adjoint = store.start_adjoint if rcfg.offload_adjoint else lambda: _in_memory
            keep = new_adjoint()
            n = len(names)
            adjoint = ([None if x is None else keep(x) for x in adj_p], [None] * n, [None] * n)
            del adj_p
            rewards = torch.zeros_like(ones)
            bounds = saved[1:] + [n_steps]
            for j in range(len(saved) - 1, -1, -1):
                begin, end = saved[j], bounds[j]
                # State 0 stays in the store until the end: it restores the target on failure.
                state = store.load(begin, work, state, keep=begin == 0)
                if j:
                    store.prefetch(saved[j - 1])  # read ahead while this segment replays
                # Recompute the segment's states (graph-free) into the working tensors; host
                # copies of all but the last, which is replayed first, straight from them.
                segment = []
                for t in range(begin, end - 1):
                    segment.append(_pack(work, state, slots))
                    state, _ = _plain_step(target, data, ones, order[t], work, state, names, optim)
                for t in range(end - 1, begin - 1, -1):
                    if t < end - 1:
                        state = _copy_into(segment.pop(), work, state, slots)
                    box = [adjoint]
                    del adjoint
                    adjoint, d_eps = _reverse_step(
                        target, data, order[t], work, state, names, optim, slots, box, ones,
                        t == 0, new_adjoint(),
                    )
                    if d_eps is not None:
                        rewards += d_eps
            modified = False  # the last step replayed state 0 in the working tensors
    finally:
        try:
            if modified:
                store.load(0, work, state, keep=True)
        finally:
            store.close()
    if times is not None:
        times["inner_sft"] = middle - start
        times["attribution"] = time.perf_counter() - middle
    return rewards.detach(), value.detach(), losses
