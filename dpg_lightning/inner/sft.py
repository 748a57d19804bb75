"""One inner SFT of the target on a synthetic set: plain, or differentiable in ``eps``.

:func:`run_sft` picks the unrolled backend (:mod:`dpg_lightning.inner.unrolled`);
:func:`sft_on_texts` is the plain SFT on raw texts that validation and the observing callbacks
run, so that "what this data teaches the target" is computed one way everywhere. The
metagradient itself is :mod:`dpg_lightning.inner.attribution`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dpg_lightning.data.tokenization import TokenRows
from dpg_lightning.inner.config import InnerConfig
from dpg_lightning.inner.metric import MetricFn
from dpg_lightning.inner.steps import Progress, inner_order, trainable_names
from dpg_lightning.inner.unrolled import GradReduce, func_sft, higher_sft


def run_sft(
    target: nn.Module,
    data: TokenRows,
    eps: Tensor,
    phi: MetricFn,
    cfg: InnerConfig,
    order: list[Tensor],
    create_graph: bool,
    grad_reduce: GradReduce | None = None,
    progress: Progress | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Train a copy of ``target`` (its weights are never modified) and return ``(Phi, losses)``.

    With ``create_graph`` the whole SFT stays on the autograd tape, so ``Phi`` can be
    differentiated w.r.t. ``eps``; without it this is plain SFT (graph freed every step), used
    for validation and the dataset-level reward. ``grad_reduce`` (shared SFT across ranks) must
    SUM the ranks' step gradients; the returned losses are then the global step losses.
    """
    names = trainable_names(target, cfg.train_params)
    backend = higher_sft if (create_graph and cfg.backend == "higher") else func_sft
    with torch.enable_grad():
        value, losses = backend(
            target, data, eps, phi, cfg, order, names, create_graph, grad_reduce, progress
        )
    if grad_reduce is not None:
        losses = list(grad_reduce([torch.stack(losses)])[0].unbind())
    return value, losses


def sft_on_texts(
    target: nn.Module,
    tokenizer,
    texts: list[str],
    phi: MetricFn,
    cfg: InnerConfig,
    seed: int,
    progress: Progress | None = None,
) -> Tensor:
    """``phi`` of the target after a plain SFT on ``texts`` (tokenized as every SFT example).

    The order is shuffled with ``seed`` (when ``cfg.shuffle``), and a set smaller than
    ``cfg.batch_size`` is one batch. ``phi`` sees the trained target, so it can also read it
    out (validation readouts, the LM-head patch a callback draws).
    """
    device = next(target.parameters()).device
    data = cfg.tokenize(texts, tokenizer).to(device)
    order = inner_order(len(data), min(cfg.batch_size, len(data)), cfg.shuffle, seed)
    eps = torch.ones(len(data), device=device)
    value, _ = run_sft(target, data, eps, phi, cfg, order, False, progress=progress)
    return value.detach()
