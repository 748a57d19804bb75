"""How closely one per-example score (DPG's ``r_i``) tracks another (the exact leave-one-out).

A policy gradient only uses rewards through their ranking and relative scale within a batch
(after a baseline and scaling), so one number is not enough: Pearson (linear agreement),
Spearman (ranking), two least-squares slopes (is ``r`` biased in scale?), the relative error
(is it the same number?) and sign agreement (does it reward and punish the same examples?).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass(frozen=True)
class Agreement:
    """Statistics of ``estimate`` (e.g. rewards) against ``reference`` (e.g. leave-one-out).

    Attributes:
        n: number of examples.
        pearson: linear correlation (NaN when either has no spread).
        spearman: correlation of ranks (ties share their mean rank).
        slope_origin: ``s`` minimising ``||reference - s * estimate||`` (fit through the
            origin: ``reference ~= s * estimate``; 1 when the scales agree).
        slope, intercept: ordinary least squares ``reference ~= intercept + slope * estimate``.
        relative_error: ``||estimate - reference|| / ||reference||`` (Euclidean norms).
        sign_agreement: fraction of examples where both have the same sign (zero counts as
            its own sign).
    """

    n: int
    pearson: float
    spearman: float
    slope_origin: float
    slope: float
    intercept: float
    relative_error: float
    sign_agreement: float


def ranks(x: Tensor) -> Tensor:
    """1-based ranks of ``x``, ties given the mean of the ranks they span."""
    x = x.to(torch.float64)
    order = torch.argsort(x, stable=True)
    out = torch.empty_like(x)
    sorted_x = x[order]
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        out[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return out


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else math.nan


def agreement(estimate: Tensor, reference: Tensor) -> Agreement:
    """The statistics of ``estimate`` against ``reference`` (same shape ``[n]``, n >= 2)."""
    x = estimate.detach().to(torch.float64).flatten().cpu()
    y = reference.detach().to(torch.float64).flatten().cpu()
    if x.shape != y.shape or len(x) < 2:
        raise ValueError(f"need two equal-length vectors of >= 2 values, got {x.shape}, {y.shape}")
    xx = float((x * x).sum())
    xc = x - x.mean()
    var = float((xc * xc).sum())
    slope = float((xc * (y - y.mean())).sum()) / var if var > 0 else math.nan
    norm_y = float(y.norm())
    return Agreement(
        n=len(x),
        pearson=pearson(x, y),
        spearman=pearson(ranks(x), ranks(y)),
        slope_origin=float((x * y).sum()) / xx if xx > 0 else math.nan,
        slope=slope,
        intercept=float(y.mean()) - slope * float(x.mean()),
        relative_error=float((x - y).norm()) / norm_y if norm_y > 0 else math.nan,
        sign_agreement=float((torch.sign(x) == torch.sign(y)).double().mean()),
    )


def write_report(
    path: str | Path,
    rewards: Tensor,
    leave_one_out: Tensor,
    stats: Agreement,
    settings: dict,
) -> None:
    """The per-example arrays, the statistics and the settings (seed, commit, config, wall
    time: whatever makes the numbers reproducible) as one JSON file."""
    report = {
        "rewards": rewards.detach().double().cpu().tolist(),
        "leave_one_out": leave_one_out.detach().double().cpu().tolist(),
        "statistics": {k: (None if isinstance(v, float) and math.isnan(v) else v)
                       for k, v in asdict(stats).items()},
        "settings": settings,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def scatter_figure(estimate: Tensor, reference: Tensor, stats: Agreement, title: str = "",
                   xlabel: str = "reward r_i = dPhi/deps_i",
                   ylabel: str = "leave-one-out Phi(D) - Phi(D - i)"):
    """A scatter of ``reference`` against ``estimate`` with the ``y = x`` line and the fit
    through the origin (``matplotlib.figure.Figure``; no pyplot, so no global state)."""
    from matplotlib.figure import Figure

    x = estimate.detach().double().cpu().numpy()
    y = reference.detach().double().cpu().numpy()
    fig = Figure(figsize=(4.5, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(x, y, s=14)
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="y = x")
    if not math.isnan(stats.slope_origin):
        ax.plot([lo, hi], [stats.slope_origin * lo, stats.slope_origin * hi], lw=0.8,
                label=f"fit through 0: slope {stats.slope_origin:.3g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"Pearson {stats.pearson:.3f}, Spearman {stats.spearman:.3f}")
    ax.legend(fontsize=7)
    return fig
