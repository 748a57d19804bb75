"""What one inner SFT step is, shared by every backend: its batch, its loss, its parameters.

One SFT = one epoch over the synthetic set in a given order, ``batch_size`` examples per step.
Example i's loss is its mean token cross-entropy; a step's loss is ``sum_i eps_i * loss_i / B``
(B = examples in that step), so ``eps_i = 1`` is ordinary SFT and ``dPhi/deps_i`` is the effect
of up-weighting example i: its DPG reward.

Shared SFT across ranks: ``order`` holds the rank's *local* indices of every global batch with
``-1`` for examples held by other ranks (so ``len(idx)`` is still the global B); see
:mod:`dpg_lightning.shared_sft`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpg_lightning.errors import ConfigError
from dpg_lightning.tokenization import TokenRows

#: ``forward(input_ids, attention_mask)`` of the target at one step's weights.
Forward = Callable[[Tensor, Tensor], object]
#: ``progress(phase, done, total)``: where a long computation is (``inner SFT``,
#: ``attribution``), for progress bars; ``None`` reports nothing.
Progress = Callable[[str, int, int], None]


def per_example_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy of each row over its scored tokens, shape ``[B]``."""
    targets = labels[:, 1:]
    tok = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
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
            f"`model.inner.train_params: {spec}` selects no parameter of the target; use `all`, "
            f"`lm_head`, or a regex over names such as {names[:3]}"
        )
    return chosen


def inner_order(n: int, batch_size: int, shuffle: bool, seed: int) -> list[Tensor]:
    """Index batches of one epoch over ``n`` examples (last batch may be smaller)."""
    if batch_size < 1 or batch_size > n:
        raise ConfigError(
            f"`model.inner.batch_size` is {batch_size} but the synthetic set has {n} examples "
            "(num_prompts x samples_per_prompt): choose 1 <= inner.batch_size <= that"
        )
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    return list(perm.split(batch_size))


def step_loss(
    forward: Forward, data: TokenRows, idx: Tensor, eps: Tensor, autocast: str = "none"
) -> Tensor:
    """This rank's part of a step loss; ``-1`` in ``idx`` marks other ranks' examples.

    The divisor is the global batch size ``len(idx)``, so summing the ranks' gradients gives
    the gradient of the one global step loss. A rank holding none of the step's examples still
    runs a zero-weighted stand-in example: its step gradient is then an exact zero that is
    still connected to ``eps``, so every rank takes part in every collective, forward and
    backward (autograd skips nodes that do not lead to ``eps``, which would deadlock).
    """
    idx = idx.to(data.input_ids.device)
    local = idx[idx >= 0]
    weight = eps[local]
    if len(local) == 0:
        local, weight = idx.new_zeros(1), eps[:1] * 0
    device_type = data.input_ids.device.type
    bf16 = autocast == "bf16"
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
        logits = forward(data.input_ids[local], data.attention_mask[local]).logits
    losses = per_example_loss(logits.to(eps.dtype), data.labels[local])
    return (weight * losses).sum() / len(idx)


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
