"""Where ``replay`` keeps what it saves: training states and the carried adjoint.

:class:`Store` keeps the states the forward pass saves (trainable parameters and optimizer
moments before a step), in host memory or in a private directory on disk, and offloaded parts
of the adjoint the reverse pass carries. :func:`check_replay_storage` is the admission check:
before any SFT work, whether the states the checkpoint policy saves fit where they go.

On disk a state is one raw file: its tensors' bytes back to back, written from and read back
into the working tensors' own memory (no pickling; a staging copy only per tensor and only for
accelerator tensors), with shapes and dtypes kept in memory. ``torch.save`` of hundreds of
small tensors cost more than the SFT step on small models. Writes run on a background thread
so they overlap the next gradient computation.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor, nn

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.inner.config import InnerConfig, ReplayConfig
from dpg_lightning.inner.optim import OptimState, used_slots
from dpg_lightning.inner.steps import trainable_names


def checkpoint_steps(cfg: ReplayConfig, n_steps: int) -> list[int]:
    """Steps ``t`` (0-based) before which the forward pass saves the training state."""
    if n_steps < 1:
        raise ConfigError(f"the inner SFT has {n_steps} steps; replay needs at least one")
    if cfg.checkpoint == "every":
        k = 1
    elif cfg.checkpoint == "every_k":
        k = cfg.k
    else:  # sqrt (ReplayConfig admits no other value)
        k = max(1, math.ceil(math.sqrt(n_steps)))
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
            raise ConfigError(
                f"`inner.replay.directory: {directory}` is not writable ({err}); the replay "
                f"backend needs about {_human(stored)} there for {what}. Choose a writable "
                "directory or `inner.replay.storage: cpu`", "inner.replay.directory",
                "inner.replay.storage",
            ) from err
        free = shutil.disk_usage(directory).free
        needed = int(stored * 1.01) + 65536  # raw files: tensor bytes only, plus a margin
        if free < needed:
            raise ConfigError(
                f"`inner.replay.directory: {directory}` has {_human(free)} free but the "
                f"replay backend needs about {_human(needed)} for {what}. Free space, choose "
                "another directory, or save fewer states (`inner.replay.checkpoint: sqrt`)",
                "inner.replay.directory", "inner.replay.checkpoint",
            )
        host = buffered  # the recompute buffer of one segment lives in host memory
    else:  # cpu (ReplayConfig admits no other value)
        host = stored + buffered
    available = _mem_available()
    if host and available is not None and host > available:
        raise ConfigError(
            f"the replay backend needs about {_human(host)} of host memory for {what} "
            f"(+ a recompute buffer of {segment - 1} state(s)) but only {_human(available)} is "
            "available. Use `inner.replay.storage: disk` or `inner.replay.checkpoint: sqrt`",
            "inner.replay.storage", "inner.replay.checkpoint",
        )
    return stored + buffered


# The adjoint the reverse pass carries: d Phi / d (parameters, first moments, second moments),
# one entry per trainable parameter (None where nothing depends on it or the slot is unused),
# each a one-shot fetcher (:class:`_Held`, :class:`_OnDisk`) that the backward calls.
Fetch = Callable[[], Tensor]
Carried = tuple[list[Fetch | None], list[Fetch | None], list[Fetch | None]]
# Turns a finished part of an adjoint into its fetcher (held in memory or offloaded).
Stash = Callable[[Tensor], Fetch]


class Store:
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
            self.memory[t] = pack_state(params, state, self.slots)
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
            return load_packed(payload, params, state, self.slots)
        self.wait()
        path = self._path(t)
        with open(path, "rb", buffering=0) as f:
            for x in _tensors(params, state, self.slots):
                _read_into(f, x, path)
        if not keep:
            os.remove(path)
        step = self.steps[t] if keep else self.steps.pop(t)
        return OptimState(step, state.exp_avg, state.exp_avg_sq)

    def start_adjoint(self) -> Stash:
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

        def stash(x: Tensor) -> _OnDisk:
            nonlocal offset
            future = self._writer.submit(_write, path, [x.to("cpu")], "ab")
            self._pending.append(future)
            fetcher = _OnDisk(future, path, offset, x)
            offset += x.numel() * x.element_size()
            return fetcher

        return stash

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


def in_memory(x: Tensor) -> _Held:
    """The :data:`Stash` that leaves a part of the adjoint where it is."""
    return _Held(x, x.device)



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


def pack_state(params: list[Tensor], state: OptimState, slots: tuple[bool, bool]) -> dict:
    """A host copy of a state (lists the update never reads, always zero, left out)."""
    copies = [x.detach().to("cpu", copy=True) for x in _tensors(params, state, slots)]
    return {"step": state.step, "tensors": copies}


@torch.no_grad()
def load_packed(
    payload: dict, params: list[Tensor], state: OptimState, slots: tuple[bool, bool]
) -> OptimState:
    """Copy a :func:`pack_state` payload into the working tensors; returns the loaded state."""
    for src, x in zip(payload["tensors"], _tensors(params, state, slots), strict=True):
        x.copy_(src)
    return OptimState(payload["step"], state.exp_avg, state.exp_avg_sq)


