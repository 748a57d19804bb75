"""Figures of ``benchmarks/compare.py``: one PNG per tiny task, from its jsonl rows.

Each figure has one panel per readout: its learning curve (the validation readout against the
generator updates taken) for DPG and for the dataset-level reward, the mean over seeds as a line
and the seeds' range as a band. Step 0 is the untrained generator. For the LM-head pattern tasks
(``67``, QR) more panels show the target image (``LMHeadPattern.bitmap``, 1 = ink) beside the
patch drawn at the end: ``ink_sign * sign(P - P_initial)`` after plain SFT of the initial target
on the final generator's validation sample (black: moved the ink's way, white: the background's,
gray: unchanged), for DPG and for the dataset reward (the run of the median seed of each).

matplotlib's object API only (``Figure``), no ``pyplot``: no GUI backend, no global state.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

#: How each reward is drawn: (label, colour).
STYLE = {"dpg": ("DPG (metagradient rewards)", "tab:blue"),
         "dataset": ("dataset-level reward", "tab:orange")}
#: Readouts that are shares (drawn on 0..1) and chance levels (a dotted line).
SHARES = {"qr_decodes", "text_emitted_share", "text_prefix_share", "es_share"}
CHANCE = {"pixel_accuracy": 0.5}


def mean_curve(curves: Sequence[dict[int, float]]) -> tuple[list[int], list[float], list[float],
                                                              list[float]]:
    """Steps present in every curve, and the mean, minimum and maximum over curves there."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    values = [[c[s] for c in curves] for s in steps]
    return (steps, [statistics.fmean(v) for v in values], [min(v) for v in values],
            [max(v) for v in values])


def representative(rows: list[dict], key: str, better: str) -> dict | None:
    """The row of the median seed by its final ``key`` (the better middle one when even)."""
    rows = [r for r in rows if r.get("patch") and key in r.get("final", {})]
    if not rows:
        return None
    ranked = sorted(rows, key=lambda r: r["final"][key], reverse=better == "higher")
    return ranked[(len(ranked) - 1) // 2]


def _draw_curves(ax, rows_by_reward: dict[str, list[dict]], key: str, better: str) -> None:
    for reward, (label, color) in STYLE.items():
        curves = [{int(s): v[key] for s, v in r["curve"] if key in v}
                  for r in rows_by_reward.get(reward, [])]
        curves = [c for c in curves if c]
        if not curves:
            continue
        steps, mean, low, high = mean_curve(curves)
        ax.plot(steps, mean, color=color, marker="o", markersize=3,
                label=f"{label}, {len(curves)} seed{'s' * (len(curves) > 1)}")
        if len(curves) > 1:
            ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
    if key in CHANCE:
        ax.axhline(CHANCE[key], color="gray", linestyle=":", label="chance")
    if key in SHARES:
        ax.set_ylim(-0.05, 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generator updates (0 = untrained)")
    ax.set_ylabel(key)
    ax.set_title(f"{key} ({better} is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _draw_image(ax, values: np.ndarray, title: str, limits: tuple[float, float]) -> None:
    ax.imshow(values, cmap="gray_r", vmin=limits[0], vmax=limits[1], interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _patch_title(name: str, row: dict) -> str:
    patch = row["patch"]
    title = f"{name}, seed {row['seed']}\npixel acc. {patch['pixel_accuracy']:.3f}"
    if "qr_text" in patch:
        title += f", QR: {patch['qr_text']!r}" if patch["qr_text"] else ", QR: unreadable"
    return title


def task_figure(task: str, rows: list[dict], readouts: Sequence[tuple[str, str]],
                path: Path, pattern_key: str | None = None) -> Path | None:
    """Draw ``path`` for ``task`` from its successful jsonl ``rows``; ``readouts`` are
    ``(key, "higher"|"lower")`` curves; ``pattern_key`` picks the representative seed of a
    pattern task (its rows carry ``patch``). Returns ``path``, or ``None`` with nothing to draw."""
    rows = [r for r in rows if r.get("status", "ok") == "ok" and r.get("curve")]
    if not rows:
        return None
    by_reward = {reward: [r for r in rows if r["reward"] == reward] for reward in STYLE}
    keys = [(k, b) for k, b in readouts if any(k in v for r in rows for _, v in r["curve"])]
    images: list[tuple[np.ndarray, str, tuple[float, float]]] = []
    if pattern_key is not None:
        better = dict(readouts).get(pattern_key, "higher")
        picks = [(n, representative(by_reward[rw], pattern_key, better))
                 for n, rw in (("DPG", "dpg"), ("dataset reward", "dataset"))]
        picks = [(n, r) for n, r in picks if r is not None]
        if picks:
            target = np.asarray(picks[0][1]["patch"]["target"], dtype=float)
            images.append((target, "target image (black = ink)", (0.0, 1.0)))
            images += [(np.asarray(r["patch"]["drawn"], dtype=float), _patch_title(n, r),
                        (-1.0, 1.0)) for n, r in picks]
    ncols = len(keys) + len(images)
    fig = Figure(figsize=(4.6 * len(keys) + 3.0 * len(images), 4.0), dpi=110)
    axes = np.atleast_1d(fig.subplots(1, ncols, width_ratios=[1.5] * len(keys) + [1] * len(images)))
    for ax, (key, better) in zip(axes, keys):
        _draw_curves(ax, by_reward, key, better)
    for ax, (values, title, limits) in zip(axes[len(keys):], images):
        _draw_image(ax, values, title, limits)
    steps = sorted({int(r["curve"][-1][0]) for r in rows})
    fig.suptitle(f"tiny {task}: DPG vs dataset-level reward "
                 f"({'/'.join(map(str, steps))} updates; mean and range over seeds)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
