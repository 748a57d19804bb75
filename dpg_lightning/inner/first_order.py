"""First-order rewards: the unrolled SFT's metagradient with its second-order terms dropped.

The exact reward ``r_i = dPhi/deps_i`` carries the adjoint of ``Phi`` back through every later
step, which costs one Hessian-vector product per step (``replay``) or the whole SFT on the tape
(``higher``/``func``). Treating every later step as the identity (TracIn's approximation)
leaves, for each step ``t`` that holds example ``i``, only the step's own dependence on
``eps_i``::

    r_i ~= sum_t < dPhi/dtheta_T, dtheta_{t+1}/deps_i >
         = sum_t < a_t, grad l_i(theta_t) > / divisor_t
    a_t  = (d update_t / d g_t)^T grad Phi(theta_T)     (g_t: step t's gradient)

For plain SGD ``a_t = -lr grad Phi(theta_T)``; for momentum SGD and Adam/AdamW ``a_t`` is the
closed-form adjoint of one step's update (:func:`~dpg_lightning.inner.optim.update_vjp`) with
the moments' influence on later steps dropped as well. ``< a_t, grad l_i >`` for every example
of the step at once is one forward-mode JVP of the per-example losses along ``a_t``: no
Hessian-vector product. The cost is two graph-free SFTs (the first finds ``theta_T``, the second
replays the trajectory) plus one JVP per step.

With one inner step nothing is dropped, so the rewards are the exact metagradient (tested to
float64 precision). With more steps, plain SGD drops only the later steps' curvature, so the
difference vanishes with the lr; momentum SGD and Adam/AdamW also drop the carry-over of a
step's gradient through the moments into later updates, which does not vanish with the lr
(``tests/test_first_order.py``): their first-order reward is a different estimator, not a
small-lr limit of the exact one. Same
return as :func:`~dpg_lightning.inner.attribution.metagradient_rewards`:
``(rewards, Phi, step losses)``. No shared SFT across ranks, no ``autocast``.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.data.tokenization import TokenRows
from dpg_lightning.inner.attribution_result import Attribution
from dpg_lightning.inner.config import InnerConfig
from dpg_lightning.inner.metric import MetricFn, MetricOnTarget
from dpg_lightning.inner.optim import init_state, optimizer_step_, update_vjp
from dpg_lightning.inner.shared_sft import RankOrder
from dpg_lightning.inner.steps import (
    LossRule,
    Progress,
    eps_dtype,
    functional_forward,
    micro_batches,
    per_example_loss,
    step_gradient,
    trainable_names,
)


def first_order_rewards(
    target: nn.Module,
    data: TokenRows,
    phi: MetricFn,
    cfg: InnerConfig,
    ranked: RankOrder,
    progress: Progress | None = None,
) -> Attribution:
    """First-order rewards ``sum_t <a_t, grad l_i(theta_t)> / divisor_t``, with the signature
    and result of every attribution (``backend: first_order``).

    Its seconds are the first SFT's (``inner_sft``) and the replay's with its JVPs
    (``attribution``). The target's weights are never modified.
    """
    order = ranked.batches
    if cfg.autocast != "none":
        raise ConfigError("`inner.backend: first_order` runs without `inner.autocast`; set "
                          "`inner.autocast: none`", "inner.autocast")
    if ranked.grad_reduce is not None or any(bool((idx < 0).any()) for idx in order):
        raise ConfigError("`inner.backend: first_order` has no shared SFT across ranks; use "
                          "`distributed: independent` or an exact backend", "inner.backend")
    names = trainable_names(target, cfg.train_params)
    rule = cfg.loss_rule()
    start = time.perf_counter()
    with torch.enable_grad():
        final, losses = _plain_sft(target, names, data, cfg, order, progress)
        value, grad_phi = _phi_and_gradient(target, names, final, phi)
    del final
    middle = time.perf_counter()
    rewards = torch.zeros(len(data), dtype=eps_dtype(target), device=data.input_ids.device)
    named = dict(target.named_parameters())
    params = [named[n].detach().clone() for n in names]
    state = init_state(params, cfg.optim)
    ones = torch.ones_like(rewards)
    for t, idx in enumerate(order):
        with torch.enable_grad():
            forward = functional_forward(target, names, [p.requires_grad_() for p in params])
            grads, _ = step_gradient(forward, params, data, idx, ones, rule)
        params = [p.detach() for p in params]
        adjoint = [
            None if g is None else update_vjp(
                p, g, state.exp_avg[k], state.exp_avg_sq[k], state.step + 1, cfg.optim,
                (grad_phi[k].clone(), None, None),  # update_vjp may overwrite its adjoint
            )[1]
            for k, (p, g) in enumerate(zip(params, grads))
        ]
        divisor = rule.divisor(idx)
        for chunk in micro_batches(idx, rule.micro_batch_size):
            chunk = chunk.to(rewards.device)
            along = _directional(target, names, params, adjoint, data, chunk, rule)
            rewards[chunk] += along.to(rewards.dtype) / divisor
        del adjoint
        state = optimizer_step_(params, grads, state, cfg.optim)
        if progress is not None:
            progress("attribution", t + 1, len(order))
    seconds = {"inner_sft": middle - start, "attribution": time.perf_counter() - middle}
    return Attribution(rewards, value, losses, seconds)


def _plain_sft(
    target: nn.Module,
    names: list[str],
    data: TokenRows,
    cfg: InnerConfig,
    order: list[Tensor],
    progress: Progress | None,
) -> tuple[list[Tensor], list[Tensor]]:
    """The graph-free SFT (the same step functions as every backend): final weights, losses."""
    named = dict(target.named_parameters())
    params = [named[n].detach().clone() for n in names]
    state = init_state(params, cfg.optim)
    eps = torch.ones(len(data), dtype=eps_dtype(target), device=data.input_ids.device)
    losses = []
    for idx in order:
        params = [p.requires_grad_() for p in params]
        forward = functional_forward(target, names, params)
        grads, loss = step_gradient(forward, params, data, idx, eps, cfg.loss_rule())
        params = [p.detach() for p in params]
        state = optimizer_step_(params, grads, state, cfg.optim)
        losses.append(loss)
        if progress is not None:
            progress("inner SFT", len(losses), len(order))
    return params, losses


def _phi_and_gradient(
    target: nn.Module, names: list[str], params: list[Tensor], phi: MetricFn
) -> tuple[Tensor, list[Tensor]]:
    """``Phi(theta_T)`` and its gradient w.r.t. the trained weights (zeros where unused)."""
    leaves = [p.detach().requires_grad_() for p in params]
    final = {f"target.{n}": p for n, p in zip(names, leaves)}
    value = torch.func.functional_call(MetricOnTarget(target, phi), final, ())
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return value.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]


def _directional(
    target: nn.Module,
    names: list[str],
    params: list[Tensor],
    direction: list[Tensor | None],
    data: TokenRows,
    chunk: Tensor,
    rule: LossRule,
) -> Tensor:
    """``< direction, grad l_i(params) >`` for each example ``i`` of ``chunk``: one JVP."""
    tangents = tuple(torch.zeros_like(p) if d is None else d for p, d in zip(params, direction))
    ids, mask, labels = data.input_ids[chunk], data.attention_mask[chunk], data.labels[chunk]

    def losses(*weights: Tensor) -> Tensor:
        logits = functional_forward(target, names, list(weights))(ids, mask).logits
        return per_example_loss(logits.to(dtype), labels, rule.per_token_of)

    dtype = eps_dtype(target)
    _, along = torch.func.jvp(losses, tuple(params), tangents)
    return along
