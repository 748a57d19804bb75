"""What one inner SFT step is, shared by every backend: its batch, its loss, its parameters.

One SFT = one epoch over the synthetic set in a given order, ``batch_size`` examples per step.
Example i's loss is its mean token cross-entropy; a step's loss is ``sum_i eps_i * loss_i / B``
(B = examples in that step), so ``eps_i = 1`` is ordinary SFT and ``dPhi/deps_i`` is the effect
of up-weighting example i: its DPG reward.

Shared SFT across ranks: ``order`` holds the rank's *local* indices of every global batch with
``-1`` for examples held by other ranks (so ``len(idx)`` is still the global B); see
:mod:`dpg_lightning.inner.shared_sft`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpg_lightning.common.errors import ConfigError
from dpg_lightning.data.tokenization import TokenRows

#: ``forward(input_ids, attention_mask)`` of the target at one step's weights.
Forward = Callable[[Tensor, Tensor], object]
#: ``progress(phase, done, total)``: where a long computation is (``inner SFT``,
#: ``attribution``), for progress bars; ``None`` reports nothing.
Progress = Callable[[str, int, int], None]


def per_example_loss(logits: Tensor, labels: Tensor, per_token_of: int | None = None) -> Tensor:
    """Next-token cross-entropy of each row over its scored tokens, shape ``[B]``: their mean,
    or with ``per_token_of = L`` their sum divided by ``L`` (the paper's ``sum / max_length``,
    under which longer examples weigh more)."""
    targets = labels[:, 1:]
    tok = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    if per_token_of is not None:
        return tok.sum(1) / per_token_of
    count = (targets != -100).sum(1).clamp(min=1)
    return tok.sum(1) / count


def trainable_names(target: nn.Module, spec: str) -> list[str]:
    """Names (as in ``named_parameters()``) of the parameters the inner SFT trains."""
    names = [n for n, _ in target.named_parameters()]
    if spec == "all":
        return names
    if spec == "lm_head":
        head = target.get_output_embeddings().weight
        chosen = [n for n, p in target.named_parameters() if p is head]
    else:
        chosen = [n for n in names if re.search(spec, n)]
    if not chosen:
        raise ConfigError(
            f"`inner.train_params: {spec}` selects no parameter of the target; use `all`, "
            f"`lm_head`, or a regex over names such as {names[:3]}", "inner.train_params",
        )
    return chosen


def inner_order(n: int, batch_size: int, shuffle: bool, seed: int) -> list[Tensor]:
    """Index batches of one epoch over ``n`` examples (last batch may be smaller). Which
    batch a set allows is :class:`~dpg_lightning.inner.set_size.SFTSet`'s rule; this only
    refuses an impossible one."""
    if batch_size < 1 or batch_size > n:
        raise ValueError(f"an inner batch of {batch_size} over {n} examples")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    return list(perm.split(batch_size))


@dataclass(frozen=True)
class LossRule:
    """How a step's loss is formed from its examples' losses (``InnerConfig``'s choices).

    Attributes:
        micro_batch_size: local examples per forward/backward (``None``: all at once).
        per_token_of: ``None``: an example's loss is its mean token loss; ``L``: its summed
            token loss over ``L`` (``inner.loss_normalization: max_length``, the paper's).
        sum_micro_means: the step's loss is the sum of its micro-batches' mean losses (the
            paper's gradient accumulation), i.e. the batch mean times the number of
            micro-batches ``ceil(batch / micro_batch_size)``; else the batch mean.
        autocast: ``inner.autocast``.
    """

    micro_batch_size: int | None = None
    per_token_of: int | None = None
    sum_micro_means: bool = False
    autocast: str = "none"

    def divisor(self, idx: Tensor) -> float:
        """What the step's summed, eps-weighted example losses are divided by."""
        batch = len(idx)
        if self.sum_micro_means and self.micro_batch_size is not None:
            return batch / math.ceil(batch / self.micro_batch_size)
        return batch


def micro_batches(idx: Tensor, micro_batch_size: int | None) -> list[Tensor]:
    """This rank's examples of one step (``idx``, ``-1`` for other ranks') in micro-batches.

    One micro-batch (``idx`` itself) when they all fit, so an unsplit step computes exactly
    what it always did; else chunks of at most ``micro_batch_size`` local examples, the last
    one possibly smaller.
    """
    local = idx[idx >= 0]
    if micro_batch_size is None or len(local) <= micro_batch_size:
        return [idx]
    return list(local.split(micro_batch_size))


def step_loss(
    forward: Forward,
    data: TokenRows,
    idx: Tensor,
    eps: Tensor,
    rule: LossRule = LossRule(),
    divisor: float | None = None,
) -> Tensor:
    """This rank's part of a step loss (or of one micro-batch of it); ``-1`` in ``idx`` marks
    other ranks' examples.

    The divisor is the global batch size (``len(idx)``, or ``divisor`` for a micro-batch), so
    summing the ranks' and the micro-batches' gradients gives the gradient of the one global
    step loss. A rank holding none of the step's examples still runs a zero-weighted stand-in
    example: its step gradient is then an exact zero that is still connected to ``eps``, so
    every rank takes part in every collective, forward and backward (autograd skips nodes that
    do not lead to ``eps``, which would deadlock).
    """
    divisor = rule.divisor(idx) if divisor is None else divisor
    idx = idx.to(data.input_ids.device)
    local = idx[idx >= 0]
    weight = eps[local]
    if len(local) == 0:
        local, weight = idx.new_zeros(1), eps[:1] * 0
    device_type = data.input_ids.device.type
    bf16 = rule.autocast == "bf16"
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
        logits = forward(data.input_ids[local], data.attention_mask[local]).logits
    losses = per_example_loss(logits.to(eps.dtype), data.labels[local], rule.per_token_of)
    return (weight * losses).sum() / divisor


def step_gradient(
    forward: Forward,
    params: list[Tensor],
    data: TokenRows,
    idx: Tensor,
    eps: Tensor,
    rule: LossRule = LossRule(),
    create_graph: bool = False,
    loss_fn: Callable[..., Tensor] | None = None,
) -> tuple[list[Tensor | None], Tensor]:
    """The step's gradient w.r.t. ``params``, accumulated over its micro-batches, and its loss.

    Each micro-batch's graph is built, differentiated and (without ``create_graph``) freed
    before the next, so a graph-free step needs the memory of one micro-batch, whatever the
    batch. ``loss_fn`` (default :func:`step_loss`) computes one micro-batch's loss with the
    same arguments (activation checkpointing wraps it).
    """
    loss_fn = step_loss if loss_fn is None else loss_fn
    grads: list[Tensor | None] | None = None
    total: Tensor | None = None
    divisor = rule.divisor(idx)
    for chunk in micro_batches(idx, rule.micro_batch_size):
        loss = loss_fn(forward, data, chunk, eps, rule, divisor)
        part = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        grads = list(part) if grads is None else [_add(a, b) for a, b in zip(grads, part)]
        total = loss.detach() if total is None else total + loss.detach()
    return grads, total


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return a + b


def functional_forward(target: nn.Module, names: list[str], params: list[Tensor]) -> Forward:
    """``target``'s forward with ``params`` (named ``names``) swapped in.

    Names come from ``named_parameters()``, which lists a tied weight once; ``functional_call``'s
    default ``tie_weights=True`` then swaps it into every tied slot.
    """
    current = dict(zip(names, params, strict=True))

    def forward(ids: Tensor, mask: Tensor):
        return torch.func.functional_call(target, current, (ids,), {"attention_mask": mask})

    return forward


def eps_dtype(target: nn.Module) -> torch.dtype:
    """dtype of the virtual example weights: the target's, but at least float32."""
    dtype = next(target.parameters()).dtype
    if not dtype.is_floating_point or dtype.itemsize < 4:
        dtype = torch.float32
    return dtype
