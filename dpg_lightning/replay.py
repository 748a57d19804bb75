"""``replay``: the exact DPG metagradient in memory that does not grow with the inner steps.

The ``higher``/``func`` backends keep the whole unrolled SFT on the autograd tape, so memory
grows linearly with inner steps and long inner loops (e.g. 96 Adam steps on a GPT-2 target) do
not fit. This backend computes the very same ``r_i = dPhi/deps_i`` by reverse-mode
differentiation *one step at a time*:

1. Forward: plain SFT with no graph kept across steps, saving (trainable parameters, optimizer
   state) before some steps (the checkpoint policy) to CPU memory or to disk. The state before
   step 0 is never saved: it is the target's own weights and zero moments.
2. ``dPhi/dparams`` at the trained parameters (the adjoint of the last state).
3. Reverse: for t = T-1 .. 0, reload (or recompute from the nearest earlier checkpoint) the state
   before step t, rebuild *that step's* graph (``functional_call`` + ``autograd.grad(
   create_graph=True)`` + :func:`~dpg_lightning.optim.optimizer_step`), and pull the adjoint of
   (parameters, Adam moments / SGD momentum) back through it with one vector-Jacobian product.
   The same product yields ``dPhi/deps`` for the examples of that step's batch, since ``eps``
   is a leaf of the local graph.

The math is not re-implemented: the step loss, per-example loss, parameter selection, optimizer
update and metric wrapper are imported from :mod:`dpg_lightning.inner`,
:mod:`dpg_lightning.optim` and :mod:`dpg_lightning.objectives`, so the tests can hold this
backend to ``higher`` at 1e-6 in float64.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from dpg_lightning.objectives import MetricOnTarget
from dpg_lightning.optim import OptimState, init_state, optimizer_step, used_slots

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
    """

    checkpoint: Literal["every", "every_k", "sqrt"] = "every"
    k: int = 4
    storage: Literal["cpu", "disk"] = "cpu"
    directory: str | None = None


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
    stored = per_state * (len(saved) - 1)  # the state before step 0 is never stored
    buffered = per_state * (segment - 1)
    what = (
        f"{len(saved) - 1} checkpoint(s) of {_human(per_state)} (trainable parameters + "
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


class _Store:
    """Saved training states keyed by step, in host memory or in a private directory on disk.

    On disk a state is one raw file: its tensors' bytes back to back, written from and read
    into the tensors' own memory (no pickling, no staging copy), with shapes and dtypes kept
    here. ``torch.save`` of hundreds of small tensors cost more than the SFT step on small
    models, and a staging buffer would double the copy on large ones.
    """

    def __init__(self, cfg: ReplayConfig, slots: tuple[bool, bool]) -> None:
        self.slots = slots
        self.memory: dict[int, dict] = {}
        self.layout: dict[int, tuple[int, list[int], list[tuple[list[int], torch.dtype]]]] = {}
        self.directory: str | None = None
        if cfg.storage == "disk":
            self.directory = tempfile.mkdtemp(prefix="dpg_replay_", dir=cfg.directory or None)

    def _path(self, t: int) -> str:
        return os.path.join(self.directory, f"state_{t:06d}.bin")

    def put(self, t: int, params: list[Tensor], state: OptimState) -> None:
        payload = _pack(params, state, self.slots)
        if self.directory is None:
            self.memory[t] = payload
            return
        groups = [payload["params"], payload["m"] or [], payload["v"] or []]
        tensors = [x for group in groups for x in group]
        with open(self._path(t), "wb") as f:
            for x in tensors:
                f.write(_bytes(x))
        specs = [(list(x.shape), x.dtype) for x in tensors]
        self.layout[t] = (payload["step"], [len(g) for g in groups], specs)

    def pop(self, t: int, device: torch.device) -> tuple[list[Tensor], OptimState]:
        if self.directory is None:
            return _unpack(self.memory.pop(t), device)
        step, (n_p, n_m, n_v), specs = self.layout.pop(t)
        path = self._path(t)
        tensors = []
        with open(path, "rb", buffering=0) as f:
            for shape, dtype in specs:
                x = torch.empty(shape, dtype=dtype)
                view, done = memoryview(_bytes(x)), 0
                while done < len(view):
                    got = f.readinto(view[done:])
                    if not got:
                        raise RuntimeError(f"replay checkpoint {path} is truncated")
                    done += got
                tensors.append(x)
        os.remove(path)
        payload = {
            "step": step,
            "params": tensors[:n_p],
            "m": tensors[n_p : n_p + n_m] if n_m else None,
            "v": tensors[n_p + n_m :] if n_v else None,
        }
        return _unpack(payload, device)

    def close(self) -> None:
        self.memory.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def _bytes(x: Tensor):
    """A host tensor's memory as a writable byte buffer (numpy view, any dtype incl. bf16)."""
    return x.contiguous().reshape(-1).view(torch.uint8).numpy()


def _pack(params: list[Tensor], state: OptimState, slots: tuple[bool, bool]) -> dict:
    """A state as host tensors; optimizer lists the update never reads (always zero) are dropped.

    Tensors are never updated in place (``optimizer_step`` is functional), so on a CPU run the
    host copy shares storage with the live tensor instead of cloning it.
    """
    return {
        "step": state.step,
        "params": [p.detach().to("cpu") for p in params],
        "m": [m.detach().to("cpu") for m in state.exp_avg] if slots[0] else None,
        "v": [v.detach().to("cpu") for v in state.exp_avg_sq] if slots[1] else None,
    }


def _unpack(payload: dict, device: torch.device) -> tuple[list[Tensor], OptimState]:
    params = [p.to(device) for p in payload["params"]]
    unused = [None] * len(params)  # lists the update never reads (see ``init_state``)
    m = [t.to(device) for t in payload["m"]] if payload["m"] is not None else unused
    v = [t.to(device) for t in payload["v"]] if payload["v"] is not None else unused
    return params, OptimState(payload["step"], m, v)


def _forward_fn(target: nn.Module, names: list[str], params: list[Tensor]):
    # Names come from named_parameters(), which lists a tied weight once; functional_call's
    # default tie_weights=True then swaps it into every tied slot (as inner._func_sft does).
    current = dict(zip(names, params, strict=True))

    def forward(ids: Tensor, mask: Tensor):
        return torch.func.functional_call(target, current, (ids,), {"attention_mask": mask})

    return forward


def _plain_step(target, data, eps, idx, params, state, names, optim):
    """One graph-free SFT step; returns ``(params, state, loss)``."""
    from dpg_lightning.inner import _batch_loss

    leaves = [p.detach().requires_grad_() for p in params]
    loss = _batch_loss(_forward_fn(target, names, leaves), data, idx, eps)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    with torch.no_grad():
        new_params, new_state = optimizer_step(
            [p.detach() for p in leaves], list(grads), state, optim
        )
    return new_params, new_state, loss.detach()


def _reverse_step(target, data, idx, params, state, names, optim, slots, box, eps_like, first):
    """Pull the adjoint (dPhi/dparams, dPhi/dm, dPhi/dv) after step back to before it.

    The adjoint comes in ``box`` (a one-item list, emptied here) so that the caller holds no
    reference to it: once autograd has used it, its memory is released during the backward
    instead of living next to the new adjoint until this step returns.

    Rebuilds only this step's graph: the parameter gradient is taken with ``create_graph`` so
    the update is differentiable in the parameters (Hessian-vector product), the moments and
    this step's ``eps``. Returns ``(adjoint_before, dPhi/deps)``. For the ``first`` step the
    adjoint of the initial state is never used, so only ``dPhi/deps`` is asked of autograd,
    which then skips the branches that lead only to the parameters.
    """
    from dpg_lightning.inner import _batch_loss

    adj_p, adj_m, adj_v = box.pop()
    p_in = [p.detach().requires_grad_() for p in params]
    m_in = [m.detach().requires_grad_() if slots[0] else None for m in state.exp_avg]
    v_in = [v.detach().requires_grad_() if slots[1] else None for v in state.exp_avg_sq]
    eps = torch.ones_like(eps_like, requires_grad=True)
    loss = _batch_loss(_forward_fn(target, names, p_in), data, idx, eps)
    grads = list(torch.autograd.grad(loss, p_in, create_graph=True, allow_unused=True))

    # Update and contract one parameter at a time, each output with its adjoint into one
    # scalar (d(out . adj)/d(out) = adj exactly, so the result is unchanged): only one
    # parameter's updated copy exists at a time instead of a whole second set of weights,
    # and each gradient's buffer is released as soon as autograd no longer needs it.
    total = None
    for j, p in enumerate(p_in):
        g, grads[j] = grads[j], None
        one = OptimState(state.step, [m_in[j]], [v_in[j]])
        (out_p,), out_s = optimizer_step([p], [g], one, optim)
        outs = [(out_p, adj_p[j])]
        if slots[0]:
            outs.append((out_s.exp_avg[0], adj_m[j]))
        if slots[1]:
            outs.append((out_s.exp_avg_sq[0], adj_v[j]))
        del g, out_p, out_s
        for out, adj in outs:
            if adj is not None and out.requires_grad:
                term = torch.dot(out.reshape(-1), adj.reshape(-1))
                total = term if total is None else total + term
        del outs, out, adj
    del adj_p, adj_m, adj_v  # from here on only the graph holds them (see docstring)
    n = len(p_in)
    if total is None:  # nothing downstream depends on this step's output
        return (([None] * n, [None] * n, [None] * n)), None
    if first:
        (d_eps,) = torch.autograd.grad(total, [eps], allow_unused=True)
        return (([None] * n, [None] * n, [None] * n)), d_eps
    inputs = p_in + (m_in if slots[0] else []) + (v_in if slots[1] else []) + [eps]
    grads_in = torch.autograd.grad(total, inputs, allow_unused=True)
    new_p = list(grads_in[:n])
    rest = list(grads_in[n:-1])
    new_m = rest[:n] if slots[0] else [None] * n
    new_v = rest[-n:] if slots[1] else [None] * n
    return (new_p, new_m, new_v), grads_in[-1]


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
    including recomputation between checkpoints).
    """
    from dpg_lightning.inner import trainable_names

    start = time.perf_counter()
    n_steps = len(order)
    check_replay_storage(cfg, target, n_steps)
    rcfg, optim = cfg.replay, cfg.optim
    slots = used_slots(optim)
    saved = checkpoint_steps(rcfg, n_steps)
    names = trainable_names(target, cfg.train_params)
    device = next(target.parameters()).device
    dtype = next(target.parameters()).dtype
    if not dtype.is_floating_point or dtype.itemsize < 4:
        dtype = torch.float32
    ones = torch.ones(len(data), dtype=dtype, device=data.input_ids.device)

    store = _Store(rcfg, slots)
    try:
        with torch.enable_grad():
            named = dict(target.named_parameters())
            params = [named[n].detach() for n in names]
            state = init_state(params, optim)
            losses = []
            # The state before step 0 is the target's own weights (never modified: the SFT
            # is functional) and zero moments: rebuilt, not stored.
            saved_set = set(saved) - {0}
            for t, idx in enumerate(order):
                if t in saved_set:
                    store.put(t, params, state)
                params, state, loss = _plain_step(
                    target, data, ones, idx, params, state, names, optim
                )
                losses.append(loss)

            final = [p.detach().requires_grad_() for p in params]
            value = torch.func.functional_call(
                MetricOnTarget(target, phi),
                {f"target.{n}": p for n, p in zip(names, final, strict=True)},
                (),
            )
            adj_p = list(torch.autograd.grad(value, final, allow_unused=True))
            # ``value``'s graph ends in the leaves ``final``: detach it, or the final weights
            # stay referenced (and in memory) through the whole reverse pass.
            value = value.detach()
            del params, state, final
            middle = time.perf_counter()

            # The adjoint lives only in ``adjoint`` (rebound every step): a second name for
            # the first one would keep a parameter-sized copy alive through the whole pass.
            adjoint = (adj_p, [None] * len(names), [None] * len(names))
            del adj_p
            rewards = torch.zeros_like(ones)
            bounds = saved[1:] + [n_steps]
            for begin, end in zip(reversed(saved), reversed(bounds), strict=True):
                if begin == 0:
                    params = [named[n].detach() for n in names]
                    state = init_state(params, optim)
                else:
                    params, state = store.pop(begin, device)
                if end - begin == 1:  # nothing to recompute: use the loaded state directly
                    segment = [(params, state)]
                else:
                    # Recompute the segment's states (graph-free), buffered in host memory so
                    # that only one state at a time sits on the accelerator.
                    segment = [_pack(params, state, slots)]
                    for t in range(begin, end - 1):
                        params, state, _ = _plain_step(
                            target, data, ones, order[t], params, state, names, optim
                        )
                        segment.append(_pack(params, state, slots))
                del params, state
                for t in range(end - 1, begin - 1, -1):
                    item = segment.pop()
                    p_t, s_t = _unpack(item, device) if isinstance(item, dict) else item
                    box = [adjoint]
                    del adjoint
                    adjoint, d_eps = _reverse_step(
                        target, data, order[t], p_t, s_t, names, optim, slots, box, ones, t == 0
                    )
                    if d_eps is not None:
                        rewards += d_eps
    finally:
        store.close()
    if times is not None:
        times["inner_sft"] = middle - start
        times["attribution"] = time.perf_counter() - middle
    return rewards.detach(), value.detach(), losses
