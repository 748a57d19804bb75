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
   (:func:`~dpg_lightning.inner.optim.update_vjp`, one parameter at a time), then through ``g`` with
   one backward seeded with ``dPhi/dg`` (a Hessian-vector product). That backward also yields
   ``dPhi/deps`` for the examples of that step's batch, since ``eps`` is a leaf of the local
   graph.

The step loss, parameter selection, forward update and metric wrapper are shared with the
other backends (:mod:`~dpg_lightning.inner.steps`, :mod:`~dpg_lightning.inner.optim`,
:mod:`~dpg_lightning.metrics.base`); where states are kept is
:mod:`~dpg_lightning.inner.replay_storage`. The one piece of math written for this backend is
the update's derivative (:func:`~dpg_lightning.inner.optim.update_vjp`), cheaper than autograd
through the update (``benchmarks/README.md``); it is held to autograd at 1e-12 in float64
(``tests/test_optim.py``), and the whole backend to ``higher`` at 1e-6 and to finite
differences (``tests/test_replay.py``).

**One working copy of the weights: the target's own.** Both passes update the target's trainable
parameters *in place* (:func:`~dpg_lightning.inner.optim.optimizer_step_`, bit for bit the
functional step) and reload saved states into them, so no second set of weights ever exists on the
device: the forward step holds the weights and their gradient, never the old and the new weights at
once, and a reverse step replays step t in the same tensors that held step t+1. Without this every
step but the first would need one weight-sized buffer more than the first (the state it reloads).
The price: the state before step 0 is saved like any other, and the target is restored from it bit
for bit when the call returns or fails.

**The adjoint travels as fetchers.** The reverse step fetches each parameter's part of the
adjoint it carries only when it differentiates that parameter's update, and hands each part of
the new adjoint on as soon as it is final (a moment's right there, a parameter's after the
Hessian-vector product). With ``inner.replay.offload_adjoint`` the parts wait in the checkpoint
storage between steps, so the peak holds no carried adjoint: with Adam that is three weight
copies, two of them (the moments') absent from a 1-step run.

Checkpointing is done at the level of whole inner steps, never with transformers' gradient
checkpointing: that recompute runs after ``functional_call`` has restored the module's own
parameters and silently differentiates the wrong weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from dpg_lightning.data.tokenization import TokenRows
from dpg_lightning.inner.attribution_result import Attribution
from dpg_lightning.inner.config import InnerConfig
from dpg_lightning.inner.metric import MetricFn, MetricOnTarget
from dpg_lightning.inner.optim import (
    InnerOptimConfig,
    OptimState,
    init_state,
    optimizer_step_,
    update_vjp,
    used_slots,
)
from dpg_lightning.inner.replay_storage import (
    Carried,
    Fetch,
    Stash,
    Store,
    check_replay_storage,
    checkpoint_steps,
    in_memory,
    load_packed,
    pack_state,
)
from dpg_lightning.inner.shared_sft import RankOrder
from dpg_lightning.inner.steps import (
    LossRule,
    Progress,
    eps_dtype,
    functional_forward,
    micro_batches,
    step_gradient,
    step_loss,
    trainable_names,
)
from dpg_lightning.inner.unrolled import GradReduce


@dataclass(frozen=True)
class _Replay:
    """What every step of one replay shares: the target and its trained parameters' names,
    the synthetic set, the optimizer and which moment lists it uses, ``ones`` (the virtual
    example weights at 1, a template of their dtype and device), how a step's loss is
    formed (micro-batches, normalisation), and, for an SFT shared by several ranks, the
    differentiable SUM across ranks of per-rank gradients
    (:mod:`dpg_lightning.inner.shared_sft`)."""

    target: nn.Module
    data: TokenRows
    names: list[str]
    optim: InnerOptimConfig
    slots: tuple[bool, bool]
    ones: Tensor
    rule: LossRule
    reduce: GradReduce | None = None


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


def _plain_step(
    run: _Replay, idx: Tensor, params: list[Tensor], state: OptimState, wait=None
) -> tuple[OptimState, Tensor]:
    """One graph-free SFT step, applied in place to ``params`` and ``state``'s moments.

    The update is :func:`~dpg_lightning.inner.optim.optimizer_step_`, bit for bit the
    functional step that the reverse pass differentiates, without a second set of weights.
    ``wait`` (if given) runs between the gradient and the update: a background save of the
    state being overwritten must be done by then. Returns ``(state, loss)``: the same tensors,
    step + 1.
    """
    leaves = [p.detach().requires_grad_() for p in params]
    forward = functional_forward(run.target, run.names, leaves)
    grads, loss = step_gradient(forward, leaves, run.data, idx, run.ones, run.rule)
    del leaves, forward
    if run.reduce is not None:  # the global step's gradient, the same on every rank
        grads = run.reduce(grads)
    if wait is not None:
        wait()
    return optimizer_step_([p.detach() for p in params], grads, state, run.optim), loss


def _reverse_step(
    run: _Replay,
    *,
    idx: Tensor,
    params: list[Tensor],
    state: OptimState,
    handoff: list[Carried],
    stash: Stash,
    is_first_step: bool,
) -> tuple[Carried, Tensor | None]:
    """Pull the adjoint (dPhi/dparams, dPhi/dm, dPhi/dv) after step back to before it.

    Rebuilds only this step's graph, the parameter gradient ``g`` with ``create_graph``; the
    update itself is differentiated in closed form (:func:`~dpg_lightning.inner.optim.update_vjp`),
    one parameter at a time, which gives the moments' adjoints, the parameters' adjoint through
    the update alone (their *direct* part) and ``dPhi/dg``. One backward from ``g`` with
    ``dPhi/dg`` as its seed (a Hessian-vector product, rooted in :class:`_Contract` nodes) then
    adds the rest to the parameters' adjoint and gives ``dPhi/deps`` for this step's examples,
    ``eps`` being a leaf of the local graph.

    The adjoint comes in ``handoff`` (a one-item list, emptied here) as one-shot fetchers
    (:data:`~dpg_lightning.inner.replay_storage.Carried`) so that the caller holds no reference
    to it; each parameter's part is fetched when that parameter's update is differentiated and
    released right after. The new adjoint's parts go to ``stash`` as soon as they are final:
    the moments' and the direct parts in that same loop, each parameter's whole adjoint when
    the backward reaches it (:func:`_finish`).
    Returns ``(adjoint_before, dPhi/deps)``. For the first step the adjoint of the initial
    state is never used, so only ``dPhi/deps`` is computed. ``params``/``state`` are only read
    (the graph is gone when this returns, so the caller may then overwrite them).
    """
    adj_p, adj_m, adj_v = handoff.pop()
    n = len(params)
    p_in = [p.detach().requires_grad_() for p in params]
    eps = torch.ones_like(run.ones, requires_grad=True)
    forward = functional_forward(run.target, run.names, p_in)
    chunks = micro_batches(idx, run.rule.micro_batch_size)
    divisor = run.rule.divisor(idx)
    if len(chunks) == 1:  # g with its graph; one backward through it at the end
        loss = step_loss(forward, run.data, idx, eps, run.rule, divisor)
        grads = list(torch.autograd.grad(loss, p_in, create_graph=True, allow_unused=True))
        del loss
    else:  # g without a graph; each micro-batch's graph is rebuilt below
        grads, _ = step_gradient(forward, p_in, run.data, idx, eps, run.rule)
    # The update saw the global gradient (all ranks' sum); the Hessian-vector product below
    # differentiates this rank's part of it (``grads``), and the ranks' parts are summed after.
    update_grads = None
    if run.reduce is not None:
        update_grads = run.reduce([None if g is None else g.detach() for g in grads])
    seeds: list[Tensor | None] = [None] * n  # dPhi/dg, for the micro-batches' backwards
    before: Carried = ([None] * n, [None] * n, [None] * n)
    direct: list[Fetch | None] = [None] * n  # the parameters' adjoint, but for the HVP
    total = None  # sum of <g, dPhi/dg>: the root of the Hessian-vector product
    for j in range(n):
        fetched = [None if f is None else f() for f in (adj_p[j], adj_m[j], adj_v[j])]
        adj_p[j] = adj_m[j] = adj_v[j] = None
        g, grads[j] = grads[j], None
        g_update = g
        if update_grads is not None:
            g_update, update_grads[j] = update_grads[j], None
        if all(a is None for a in fetched):
            continue  # nothing after this step depends on this parameter
        if g is None:  # not in this step's loss: the update left it and its moments as they were
            if not is_first_step:
                for part, a in zip(before, fetched, strict=True):
                    part[j] = None if a is None else stash(a)
            continue
        m = state.exp_avg[j] if run.slots[0] else None
        v = state.exp_avg_sq[j] if run.slots[1] else None
        dp, dg, dm, dv = update_vjp(
            p_in[j].detach(), g_update.detach(), m, v, state.step + 1, run.optim, tuple(fetched)
        )
        del fetched
        if not is_first_step:  # each part goes at once (offloaded, it is freed once written)
            direct[j] = None if dp is None else stash(dp)
            dp = None
            before[1][j] = None if dm is None else stash(dm)
            dm = None
            before[2][j] = None if dv is None else stash(dv)
        del dp, dm, dv
        if len(chunks) > 1:
            seeds[j] = dg
        elif g.requires_grad:
            term = _Contract.apply(g, in_memory(dg))
            total = term if total is None else total + term
            del term  # a name for a root would keep the step's whole graph alive
        del g, g_update, dg
    del adj_p, adj_m, adj_v, grads, update_grads
    inputs = [eps] if is_first_step else p_in + [eps]
    # One rank's adjoint is final only once the ranks' parts are summed (one collective after
    # the backward, in a fixed order), so a shared SFT hands the parts on after it.
    per_parameter = not is_first_step and run.reduce is None
    for k, chunk in enumerate(chunks):
        last = k == len(chunks) - 1
        if len(chunks) > 1:  # this micro-batch's share of the Hessian-vector product
            loss = step_loss(forward, run.data, chunk, eps, run.rule, divisor)
            part = torch.autograd.grad(loss, p_in, create_graph=True, allow_unused=True)
            del loss
            total = None
            for j, g in enumerate(part):
                if g is not None and g.requires_grad and seeds[j] is not None:
                    term = _Contract.apply(g, partial(seeds.__getitem__, j))
                    total = term if total is None else total + term
                    del term  # else it keeps this micro-batch's graph alive after backward
            del part, g
            if last:
                seeds = []
        # Parameters' adjoints are final after the last micro-batch's backward only.
        hooks = [] if not per_parameter or not last else [
            p.register_post_accumulate_grad_hook(partial(_finish, before[0], direct, j, stash))
            for j, p in enumerate(p_in)
        ]
        if total is not None:
            torch.autograd.backward(total, inputs=inputs)
        del total
        for hook in hooks:
            hook.remove()
    hvp = [leaf.grad for leaf in p_in]
    if run.reduce is not None and not is_first_step:
        hvp = run.reduce(hvp)
    for j, grad in enumerate(hvp):  # parameters the last backward did not reach (or shared)
        p_in[j].grad = None
        if is_first_step or before[0][j] is not None:
            continue
        rest = direct[j]
        if rest is not None or grad is not None:
            before[0][j] = stash(grad if rest is None else (
                rest() if grad is None else rest().add_(grad)))
    del hvp
    return before, eps.grad


def _finish(out: list, direct: list, j: int, stash: Stash, leaf: Tensor) -> None:
    """Post-accumulate hook of parameter ``j``: once the Hessian-vector product has reached it,
    its adjoint is final: add the direct part and hand it on at once, so that the parameters'
    new adjoint is never whole in memory while the backward runs."""
    grad, leaf.grad = leaf.grad, None
    rest, direct[j] = direct[j], None
    out[j] = stash(grad if rest is None else rest().add_(grad))


def replay_rewards(
    target: nn.Module,
    data: TokenRows,
    phi: MetricFn,
    cfg: InnerConfig,
    order: RankOrder,
    progress: Progress | None = None,
) -> Attribution:
    """DPG rewards ``r_i = dPhi/deps_i`` at ``eps = 1`` by step-wise replay.

    Same signature and result as :func:`dpg_lightning.inner.attribution.metagradient_rewards`
    (which dispatches here for ``inner.backend: replay``); its seconds are ``inner_sft``
    (forward SFT + checkpointing) and ``attribution`` (reverse pass, including recomputation
    between checkpoints). The target's trainable parameters are the working copy (see the
    module docstring) and hold their original values again on return, also when the call
    raises.
    """
    start = time.perf_counter()
    grad_reduce, batches = order.grad_reduce, order.batches
    n_steps = len(batches)
    check_replay_storage(cfg, target, n_steps)
    rcfg, optim = cfg.replay, cfg.optim
    slots = used_slots(optim)
    saved = checkpoint_steps(rcfg, n_steps)
    names = trainable_names(target, cfg.train_params)
    ones = torch.ones(len(data), dtype=eps_dtype(target), device=data.input_ids.device)
    run = _Replay(target, data, names, optim, slots, ones, cfg.loss_rule(), grad_reduce)

    named = dict(target.named_parameters())
    work = [named[n] for n in names]  # updated in place; restored from state 0 at the end
    state = init_state([p.detach() for p in work], optim)
    store = Store(rcfg, slots)
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
            for t, idx in enumerate(batches):
                if t in saved:
                    store.put(t, work, state)
                state, loss = _plain_step(run, idx, work, state, before_update)
                losses.append(loss)
                if progress is not None:
                    progress("inner SFT", t + 1, n_steps)

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
            if progress is not None:  # the reverse pass begins (its first step may be long)
                progress("attribution", 0, n_steps)

            # The adjoint lives only in ``adjoint`` (rebound every step): a second name for
            # the first one would keep a parameter-sized copy alive through the whole pass.
            new_stash = store.start_adjoint if rcfg.offload_adjoint else lambda: in_memory
            stash = new_stash()
            n = len(names)
            adjoint = ([None if x is None else stash(x) for x in adj_p], [None] * n, [None] * n)
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
                    segment.append(pack_state(work, state, slots))
                    state, _ = _plain_step(run, batches[t], work, state)
                for t in range(end - 1, begin - 1, -1):
                    if t < end - 1:
                        state = load_packed(segment.pop(), work, state, slots)
                    handoff = [adjoint]
                    del adjoint
                    adjoint, d_eps = _reverse_step(
                        run, idx=batches[t], params=work, state=state, handoff=handoff,
                        stash=new_stash(), is_first_step=t == 0,
                    )
                    if d_eps is not None:
                        rewards += d_eps
                    if progress is not None:
                        progress("attribution", n_steps - t, n_steps)
            modified = False  # the last step replayed state 0 in the working tensors
    finally:
        try:
            if modified:
                store.load(0, work, state, keep=True)
        finally:
            store.close()
    if grad_reduce is not None:  # every rank's share of each global step loss
        losses = list(grad_reduce([torch.stack(losses)])[0].unbind())
    seconds = {"inner_sft": middle - start, "attribution": time.perf_counter() - middle}
    return Attribution(rewards.detach(), value.detach(), losses, seconds)
