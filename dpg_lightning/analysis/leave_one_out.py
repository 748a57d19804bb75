"""Exact leave-one-out effects ``Phi(D) - Phi(D without i)``, by re-running the plain SFT.

DPG's reward ``r_i = dPhi/deps_i`` at ``eps = 1`` is the first-order estimate of the
leave-one-out difference ``Phi(eps = 1) - Phi(eps_i = 0)`` (the integral of ``dPhi/deps_i``
from 0 to 1). This module computes that difference exactly, one plain SFT per example, so the
two can be compared (:mod:`dpg_lightning.analysis.agreement`).

Two variants:

- ``zero_weight``: ``eps_i = 0``; every batch keeps its layout and divisor, so this is exactly
  the quantity ``r_i`` linearises.
- ``remove``: row ``i`` is dropped from the set; its batch is one example smaller (its divisor
  too), every other example keeps its step. What "training without i" means in practice.

Differences of two nearly equal ``Phi`` lose the leading digits, so the SFTs run on a float64
copy of the target by default, and every result carries its rounding floor: ``reorder_noise``
= ``|Phi(D) - Phi(D with each batch's rows reversed)|`` (the same SFT summed in another order)
and ``ulp`` = machine epsilon of the compute dtype times ``|Phi|``. Differences below
``floor`` are noise. (transformers' Llama upcasts inside RMSNorm and attention to float32, so a
float64 Llama still rounds there; the reorder noise then shows it.)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from dpg_lightning.analysis.inner_calls import plain_phi
from dpg_lightning.data.tokenization import TokenRows
from dpg_lightning.inner.config import InnerConfig
from dpg_lightning.inner.metric import MetricFn
from dpg_lightning.inner.steps import eps_dtype

Variant = Literal["zero_weight", "remove"]


@dataclass(frozen=True)
class LeaveOneOut:
    """Exact leave-one-out differences of ``K`` chosen examples.

    Attributes:
        indices: the examples, ``[K]`` (positions in the set).
        differences: ``Phi(D) - Phi(D without i)``, ``[K]`` float64.
        phi: ``Phi(D)``.
        variant: ``zero_weight`` or ``remove``.
        dtype: the dtype the SFTs computed in.
        reorder_noise: ``|Phi(D) - Phi(D, rows of each batch reversed)|``.
        ulp: machine epsilon of ``dtype`` times ``|Phi(D)|``.
    """

    indices: Tensor
    differences: Tensor
    phi: float
    variant: str
    dtype: str
    reorder_noise: float
    ulp: float

    @property
    def floor(self) -> float:
        """The smaller differences are rounding noise: the larger of the two floors."""
        return max(self.reorder_noise, self.ulp)


def as_float64(target: nn.Module) -> nn.Module:
    """A float64 copy of ``target`` (the original is untouched)."""
    return copy.deepcopy(target).to(torch.float64)


def remove_example(data: TokenRows, order: list[Tensor], i: int) -> tuple[TokenRows, list[Tensor]]:
    """The set without row ``i`` and the order without it: later rows renumbered, ``i``'s
    batch one smaller, an emptied batch dropped."""
    keep = torch.tensor([j for j in range(len(data)) if j != i], dtype=torch.long)
    rows = TokenRows(data.input_ids[keep], data.attention_mask[keep], data.labels[keep])
    new_order = []
    for idx in order:
        idx = idx[idx != i]
        if len(idx):
            new_order.append(idx - (idx > i).long())
    return rows, new_order


def leave_one_out(
    target: nn.Module,
    data: TokenRows,
    metric: MetricFn,
    cfg: InnerConfig,
    order: list[Tensor],
    indices: list[int] | Tensor | None = None,
    variant: Variant = "zero_weight",
    float64: bool = True,
) -> LeaveOneOut:
    """``Phi(D) - Phi(D without i)`` for each ``i`` in ``indices`` (default: every example).

    One plain SFT per example plus two for ``Phi(D)`` and its reorder noise. ``float64``
    computes on a float64 copy of ``target``; without it, on ``target`` as it is.
    """
    if variant not in ("zero_weight", "remove"):
        raise ValueError(f"variant must be 'zero_weight' or 'remove', got {variant!r}")
    model = as_float64(target) if float64 else target
    indices = torch.arange(len(data)) if indices is None else torch.as_tensor(indices).long()
    dtype = eps_dtype(model)
    ones = torch.ones(len(data), dtype=dtype, device=data.input_ids.device)
    phi = plain_phi(model, data, ones, metric, cfg, order)
    reordered = plain_phi(model, data, ones, metric, cfg, [idx.flip(0) for idx in order])
    without = []
    for i in indices.tolist():
        if variant == "zero_weight":
            eps = ones.clone()
            eps[i] = 0
            without.append(plain_phi(model, data, eps, metric, cfg, order))
        else:
            rows, sub_order = remove_example(data, order, i)
            without.append(plain_phi(model, rows, ones[1:], metric, cfg, sub_order))
    differences = (phi - torch.stack(without)).to(torch.float64) if without else phi.new_zeros(0)
    return LeaveOneOut(
        indices=indices,
        differences=differences.cpu(),
        phi=float(phi),
        variant=variant,
        dtype=str(dtype).removeprefix("torch."),
        reorder_noise=float((phi - reordered).abs()),
        ulp=float(torch.finfo(dtype).eps * phi.abs()),
    )
