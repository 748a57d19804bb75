"""The ``higher`` and ``func`` backends: the whole inner SFT unrolled on the autograd tape.

Two independent implementations of the same SFT (tests hold them to each other and to finite
differences): ``higher`` (the design card's engine, made correct by ``higher_compat``) and
``func`` (``torch.func.functional_call`` + ``autograd.grad(create_graph=True)``). Both use the
optimizer math of :mod:`dpg_lightning.inner.optim`. ``func`` without ``create_graph`` is also
the plain (graph-free) SFT of every backend, used for validation and the dataset reward.

Both return ``(Phi, step losses)``; ``grad_reduce`` (shared SFT) sums the ranks' step
gradients, differentiably.
"""

from __future__ import annotations

from collections.abc import Callable

import higher
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dpg_lightning.data.tokenization import TokenRows
from dpg_lightning.inner.config import InnerConfig
from dpg_lightning.inner.higher_compat import patch_module_lists, register
from dpg_lightning.inner.metric import MetricFn, MetricOnTarget
from dpg_lightning.inner.optim import init_state, optimizer_step
from dpg_lightning.inner.steps import (
    Progress,
    functional_forward,
    micro_batches,
    step_gradient,
    step_loss,
)

register()

# Sums per-rank step gradients across ranks, differentiably (``None`` entries stay ``None``).
GradReduce = Callable[[list[Tensor | None]], list[Tensor | None]]


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _checkpointed_loss(*args) -> Tensor:
    """:func:`step_loss` with its activations recomputed in the backward. The step's
    parameters reach the recompute through ``forward`` (the same tensors), not through the
    module's own attributes, so the recomputed graph is the original."""
    return checkpoint(step_loss, *args, use_reentrant=False)


def func_sft(
    target: nn.Module,
    data: TokenRows,
    eps: Tensor,
    phi: MetricFn,
    cfg: InnerConfig,
    order: list[Tensor],
    names: list[str],
    create_graph: bool,
    grad_reduce: GradReduce | None = None,
    progress: Progress | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """The SFT with ``torch.func``: parameters are plain tensors, swapped into ``target``."""
    named = dict(target.named_parameters())
    params = [named[n].detach().requires_grad_() for n in names]
    state = init_state(params, cfg.optim)
    losses = []
    for idx in order:
        forward = functional_forward(target, names, params)
        grads, loss = step_gradient(
            forward, params, data, idx, eps, cfg.loss_rule(), create_graph,
            _checkpointed_loss if cfg.activation_checkpointing else None,
        )
        if grad_reduce is not None:
            grads = grad_reduce(grads)
        params, state = optimizer_step(params, grads, state, cfg.optim)
        if not create_graph:
            params = [p.detach().requires_grad_() for p in params]
            state.exp_avg = [_detach(t) for t in state.exp_avg]
            state.exp_avg_sq = [_detach(t) for t in state.exp_avg_sq]
        losses.append(loss.detach())
        if progress is not None:
            progress("inner SFT", len(losses), len(order))
    final = {f"target.{n}": p for n, p in zip(names, params)}
    return torch.func.functional_call(MetricOnTarget(target, phi), final, ()), losses


def higher_sft(
    target: nn.Module,
    data: TokenRows,
    eps: Tensor,
    phi: MetricFn,
    cfg: InnerConfig,
    order: list[Tensor],
    names: list[str],
    create_graph: bool,
    grad_reduce: GradReduce | None = None,
    progress: Progress | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """The SFT with ``higher``: a monkey-patched copy of ``target`` and a differentiable
    optimizer (ours, registered by :mod:`~dpg_lightning.inner.higher_compat`)."""
    chosen = set(names)
    named = list(target.named_parameters())
    opt = cfg.optim.torch_class()([p for n, p in named if n in chosen], **cfg.optim.torch_kwargs())
    fmodel = higher.monkeypatch(target, copy_initial_weights=True, track_higher_grads=create_graph)
    fmodel.update_params([p.detach().requires_grad_(n in chosen) for n, p in named])
    patch_module_lists(fmodel)
    diffopt = higher.optim.get_diff_optim(
        opt,
        target.parameters(),
        fmodel=fmodel,
        override={"eps_root": [cfg.optim.eps_root]},
        track_higher_grads=create_graph,
    )
    losses = []
    forward = lambda ids, mask: fmodel(ids, attention_mask=mask)  # noqa: E731
    rule = cfg.loss_rule()
    for idx in order:
        # higher differentiates one loss per step: the micro-batches' losses are summed
        # (their forwards run one at a time; the graph of each is kept for the step's grad).
        loss, divisor = None, rule.divisor(idx)
        for chunk in micro_batches(idx, rule.micro_batch_size):
            part = step_loss(forward, data, chunk, eps, rule, divisor)
            loss = part if loss is None else loss + part
        diffopt.step(loss, grad_callback=grad_reduce)
        losses.append(loss.detach())
        if progress is not None:
            progress("inner SFT", len(losses), len(order))
    return phi(fmodel), losses
