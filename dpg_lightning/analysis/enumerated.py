"""The exact generator gradient on a case small enough to enumerate every synthetic set.

Generator: a categorical ``pi_theta = softmax(theta)`` over ``C`` candidate examples (real
token rows). A synthetic set is ``n`` i.i.d. draws; ``Phi(D)`` is the real inner SFT and metric
on a target. Sets are enumerated by multiplicity ``c`` (``sum c = n``), with probability
``n! / prod c_k! * prod p_k^c_k``, so every expectation below is an exact finite sum:

- ``grad J = E[Phi(D) s(D)]``, ``s(D) = sum_i grad log pi(x_i) = c - n p`` (the true gradient);
- DPG: ``E[sum_i r_i (e_{x_i} - p)]`` with ``r_i = dPhi/deps_i`` (or any per-draw reward);
- leave-one-out: ``E[sum_i (Phi(D) - Phi(D, eps_i = 0)) (e_{x_i} - p)]``;
- dataset REINFORCE: ``E[(Phi(D) - b*) s(D)]`` with the variance-minimising constant
  ``b* = E[Phi ||s||^2] / E[||s||^2]``.

Each estimator's expected update is compared with ``grad J`` (cosine, relative error), and its
single-set variance ``E||g||^2 - ||E g||^2`` is reported: REINFORCE is unbiased (``E s = 0``),
DPG is biased but can have a far smaller variance.

The inner SFT sees a set's draws sorted by candidate, so ``Phi`` depends on the set only. With
``batch_size = n`` (the default: ``steps`` full-batch steps) the order does not matter at all
and ``Phi(D, eps_i = 0)`` is a function of the other draws alone, so the leave-one-out update
equals ``grad J`` exactly (tested). With ``batch_size < n`` the batches depend on which
candidates were drawn, and that identity holds only approximately; ``grad J`` stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dpg_lightning.analysis.inner_calls import exact_rewards, plain_phi
from dpg_lightning.analysis.leave_one_out import as_float64
from dpg_lightning.data.tokenization import TokenRows
from dpg_lightning.inner.config import InnerConfig
from dpg_lightning.inner.metric import MetricFn

#: ``rewards(target, data, metric, cfg, order) -> (rewards, Phi, losses)``, per draw.
RewardFn = Callable[..., tuple[Tensor, Tensor, list[Tensor]]]


def multisets(num_candidates: int, n: int) -> Tensor:
    """Every count vector ``c`` of ``n`` draws over the candidates, ``[S, C]`` (stars and bars,
    ``S = binom(n + C - 1, n)``)."""
    if num_candidates == 1:
        return torch.tensor([[n]])
    rows = [torch.cat([torch.tensor([[k]]).expand(len(rest), 1), rest], 1)
            for k in range(n, -1, -1) for rest in [multisets(num_candidates - 1, n - k)]]
    return torch.cat(rows)


def set_probabilities(logits: Tensor, counts: Tensor) -> Tensor:
    """``P(c) = n! / prod c_k! * prod p_k^c_k`` under ``softmax(logits)``, float64."""
    log_p = torch.log_softmax(logits.double(), 0)
    n = counts[0].sum().double()
    log_coef = torch.lgamma(n + 1) - torch.lgamma(counts.double() + 1).sum(1)
    return torch.exp(log_coef + (counts.double() * log_p).sum(1))


def draws(counts: Tensor) -> Tensor:
    """The draws of one set, sorted by candidate (the inner SFT's row order)."""
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def set_order(n: int, batch_size: int, steps: int) -> list[Tensor]:
    """``steps`` inner steps of ``batch_size`` rows cycling through the sorted set, no shuffle:
    with ``batch_size = n``, ``steps`` full-batch steps."""
    batches = list(torch.arange(n).split(batch_size))
    return [batches[t % len(batches)] for t in range(steps)]


@dataclass
class SetValues:
    """What the inner SFT gives each enumerated set.

    Attributes:
        counts: ``[S, C]`` multiplicities.
        phi: ``Phi(D)``, ``[S]``.
        rewards: per estimator name, ``[S, n]`` rewards of the sorted draws.
        leave_one_out: ``Phi(D) - Phi(D, eps_i = 0)``, ``[S, n]`` (``None`` if not computed).
    """

    counts: Tensor
    phi: Tensor
    rewards: dict[str, Tensor] = field(default_factory=dict)
    leave_one_out: Tensor | None = None


def evaluate_sets(
    target: nn.Module,
    candidates: TokenRows,
    metric: MetricFn,
    cfg: InnerConfig,
    n: int,
    steps: int = 1,
    batch_size: int | None = None,
    reward_fns: dict[str, RewardFn] | None = None,
    with_leave_one_out: bool = True,
    float64: bool = True,
) -> SetValues:
    """Run the inner SFT of every set of ``n`` draws: ``Phi``, each reward, leave-one-out.

    ``reward_fns`` defaults to ``{"dpg": exact rewards}``. Cost per set: one SFT per reward
    function, plus ``n`` plain SFTs for the leave-one-out.
    """
    model = as_float64(target) if float64 else target
    reward_fns = {"dpg": exact_rewards} if reward_fns is None else reward_fns
    counts = multisets(len(candidates), n)
    order = set_order(n, batch_size or n, steps)
    phis, loo = [], []
    rewards: dict[str, list[Tensor]] = {name: [] for name in reward_fns}
    for c in counts:
        idx = draws(c)
        data = TokenRows(candidates.input_ids[idx], candidates.attention_mask[idx],
                         candidates.labels[idx])
        ones = torch.ones(n, dtype=next(model.parameters()).dtype)
        phi = plain_phi(model, data, ones, metric, cfg, order)
        phis.append(phi)
        for name, fn in reward_fns.items():
            rewards[name].append(fn(model, data, metric, cfg, order)[0].detach().double())
        if with_leave_one_out:
            row = []
            for i in range(n):
                eps = ones.clone()
                eps[i] = 0
                row.append(phi - plain_phi(model, data, eps, metric, cfg, order))
            loo.append(torch.stack(row).double())
    return SetValues(
        counts=counts,
        phi=torch.stack(phis).double(),
        rewards={name: torch.stack(r) for name, r in rewards.items()},
        leave_one_out=torch.stack(loo) if with_leave_one_out else None,
    )


@dataclass(frozen=True)
class Estimator:
    """One estimator's expected update against ``grad J``, and its single-set variance."""

    expected: Tensor
    cosine: float
    relative_error: float
    variance: float


@dataclass(frozen=True)
class GradientComparison:
    """``grad J`` and each estimator (``dataset_reinforce``, ``leave_one_out``, and one per
    reward function), with ``J`` and the REINFORCE baseline ``b*``."""

    true_gradient: Tensor
    objective: float
    baseline: float
    estimators: dict[str, Estimator]


def _compare(per_set: Tensor, probs: Tensor, truth: Tensor) -> Estimator:
    """``per_set``: the estimator's update for each set, ``[S, C]``."""
    expected = probs @ per_set
    second = float(probs @ (per_set * per_set).sum(1))
    norm_t, norm_e = float(truth.norm()), float(expected.norm())
    cosine = float(expected @ truth) / (norm_t * norm_e) if norm_t * norm_e > 0 else math.nan
    return Estimator(
        expected=expected,
        cosine=cosine,
        relative_error=float((expected - truth).norm()) / norm_t if norm_t > 0 else math.nan,
        variance=max(second - norm_e**2, 0.0),
    )


def per_draw_update(values: Tensor, counts: Tensor, p: Tensor) -> Tensor:
    """``sum_i values[s, i] (e_{x_i} - p)`` for each set ``s``: ``[S, C]``."""
    out = torch.zeros(len(counts), len(p), dtype=torch.float64)
    for s, c in enumerate(counts):
        onehot = torch.nn.functional.one_hot(draws(c), len(p)).double()
        out[s] = values[s] @ (onehot - p)
    return out


def compare_gradients(logits: Tensor, values: SetValues) -> GradientComparison:
    """Every expected update of :class:`SetValues` under ``softmax(logits)``, exactly."""
    p = torch.softmax(logits.double(), 0)
    counts = values.counts
    probs = set_probabilities(logits, counts)
    n = int(counts[0].sum())
    score = counts.double() - n * p  # grad_theta log P(c)
    truth = probs @ (values.phi[:, None] * score)
    sq = (score * score).sum(1)
    baseline = float(probs @ (values.phi * sq)) / float(probs @ sq)
    estimators = {"dataset_reinforce": _compare((values.phi - baseline)[:, None] * score,
                                                probs, truth)}
    if values.leave_one_out is not None:
        estimators["leave_one_out"] = _compare(
            per_draw_update(values.leave_one_out, counts, p), probs, truth)
    for name, r in values.rewards.items():
        estimators[name] = _compare(per_draw_update(r, counts, p), probs, truth)
    return GradientComparison(truth, float(probs @ values.phi), baseline, estimators)
