"""What ``studies/compare.py`` writes from ``tiny_compare.jsonl``: the table and the figures.

The table (``tiny_compare.md``): per task its latest runs (:func:`latest_runs`), each readout's
final value as mean ± std over seeds for the untrained generator, the dataset-level reward, DPG
and (language task) the paper's three per-example heuristics (Levenshtein, fastText language
ID, embedding similarity), the mean wall time per run, and which command, commit and machine
produced them.

The figures (``tiny_<task>.png``), one per task: a panel per readout with its learning curve
(the validation readout against the generator updates taken) for each method run, the mean
over seeds as a line and the seeds' range as a band; update 0 is the untrained generator. For
the LM-head pattern tasks (``67``, QR) more panels show the target image
(``LMHeadPattern.bitmap``, 1 = ink) beside the patch drawn at the end: ``ink_sign * sign(P -
P_initial)`` after plain SFT of the initial target on the final generator's validation sample
(black: moved the ink's way, white: the background's, gray: unchanged), for DPG and for the
dataset reward (the run of the median seed of each).

matplotlib's object API only (``Figure``), no ``pyplot``: no GUI backend, no global state.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

#: The methods, in table order: ``model.reward`` dpg / dataset, and the heuristics
#: (``reward: example``, their own configs; the language task only).
REWARDS = ("dataset", "dpg", "levenshtein", "fasttext", "embedding")
HEADER = {"dataset": "dataset reward", "dpg": "DPG", "levenshtein": "Levenshtein",
          "fasttext": "fastText LID", "embedding": "embedding"}
#: (readout, "higher"/"lower" is better) of a task, in table order
Readouts = Sequence[tuple[str, str]]
MEANING = {
    "lm_head_norm": "target's LM-head norm after SFT",
    "pixel_accuracy": "share of patch entries that moved their pixel's way",
    "qr_decodes": "the drawn patch reads (zxing) as the QR code's text",
    "text_emitted_share": "generator's validation samples containing the UUID",
    "text_prefix_share": "longest UUID prefix in a sample, share of its length",
    "sequence_loss": "target's mean token loss on the UUID after SFT",
    "last_word_loss": "target's loss on the last word of Spanish passages after SFT",
    "es_share": "generator's validation samples classified as Spanish",
}
#: How each reward is drawn: (label, colour).
STYLE = {"dpg": ("DPG (metagradient rewards)", "tab:blue"),
         "dataset": ("dataset-level reward", "tab:orange"),
         "levenshtein": ("Levenshtein heuristic", "tab:green"),
         "fasttext": ("fastText language-ID heuristic", "tab:red"),
         "embedding": ("embedding-similarity heuristic", "tab:purple")}
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


def _draw_curves(ax, rows_by_reward: dict[str, list[dict]], key: str, better: str,
                 legend: bool = True) -> None:
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
    if legend:
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
    methods = [HEADER[w] for w in REWARDS if by_reward[w]]
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
    # more than two methods: one legend under the panels (in a panel it hides the curves)
    shared = len(methods) > 2
    fig = Figure(figsize=(4.6 * len(keys) + 3.0 * len(images), 4.0 + 0.6 * shared), dpi=110)
    axes = np.atleast_1d(fig.subplots(1, ncols, width_ratios=[1.5] * len(keys) + [1] * len(images)))
    for ax, (key, better) in zip(axes, keys):
        _draw_curves(ax, by_reward, key, better, legend=not shared)
    for ax, (values, title, limits) in zip(axes[len(keys):], images):
        _draw_image(ax, values, title, limits)
    steps = sorted({int(r["curve"][-1][0]) for r in rows})
    title = f"tiny {task}: {' vs '.join(methods)}"
    fig.suptitle(f"{title}{chr(10) if shared else ' '}({'/'.join(map(str, steps))} updates; "
                 "mean and range over seeds)", fontsize=11)
    if shared:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
    else:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------- the table

def load_rows(path: Path) -> list[dict]:
    """The jsonl rows; rows of the previous script (no ``status``) are read as ``legacy``."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        if "status" not in r:  # old compare.py: one readout, raw csv steps, its own share
            curve = [[0 if i == 0 else s + 1, {r["key"]: v}] for i, (s, v) in enumerate(r["curve"])]
            r = {"task": r["task"], "reward": r["reward"], "seed": r["seed"], "status": "ok",
                 "commit": "legacy", "config_hash": "legacy", "wall_s": r["seconds"],
                 "steps": curve[-1][0], "curve": curve,
                 "untrained": {r["key"]: r["initial"], **({"es_share": r["share_initial"]}
                                                         if "share_initial" in r else {})},
                 "final": {r["key"]: r["final"], **({"es_share": r["share_final"]}
                                                   if "share_final" in r else {})}}
        rows.append(r)
    return rows


def latest_runs(rows: list[dict], task: str) -> list[dict]:
    """The task's latest runs: per method, the rows of its latest (commit, config) group, the
    latest per seed (so a method run alone replaces only its own rows)."""
    latest: dict[tuple[str, int], dict] = {}
    for reward in dict.fromkeys(r["reward"] for r in rows if r["task"] == task):
        mine = [r for r in rows if r["task"] == task and r["reward"] == reward]
        group = (mine[-1].get("commit"), mine[-1].get("config_hash"))
        latest.update({(reward, r["seed"]): r for r in mine
                       if (r.get("commit"), r.get("config_hash")) == group})
    order = {w: i for i, w in enumerate(REWARDS)}
    return sorted(latest.values(), key=lambda r: (order.get(r["reward"], 99), r["seed"]))


def fmt(values: list[float], spec: str = "") -> str:
    """``mean ± std`` (``.4f``), or the mean alone with a ``spec``; ``-`` for no values."""
    if not values:
        return "-"
    if spec:
        return format(statistics.fmean(values), spec)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def cell(rows: list[dict], key: str, which: str = "final") -> str:
    ok = [r[which][key] for r in rows if r["status"] == "ok" and key in r.get(which, {})]
    failed = sum(r["status"] != "ok" for r in rows)
    return fmt(ok) + (f" ({failed} failed)" if failed else "")


def task_lines(task: str, runs: list[dict], readouts: Readouts) -> tuple[list[str], list[str]]:
    """The task's lines of the results table and of the runs table (a line per command that
    produced its runs, with the methods it ran)."""
    by = {reward: [r for r in runs if r["reward"] == reward] for reward in REWARDS}
    ok = [r for r in runs if r["status"] == "ok"]
    untrained_from = [r for r in by["dpg"] if r["status"] == "ok"] or ok
    walls = " / ".join(fmt([r["wall_s"] for r in by[w] if r["status"] == "ok"], ".1f")
                       for w in REWARDS)
    lines = []
    for i, (key, better) in enumerate(readouts):
        untrained = cell(untrained_from, key, "untrained")
        methods = " | ".join(cell(by[w], key) for w in REWARDS)
        lines.append(f"| {task if i == 0 else ''} | {key} | {better} | {untrained} | {methods} | "
                     f"{walls if i == 0 else ''} |")
    info = []
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r.get("command"), r.get("commit")), []).append(r)
    for group in groups.values():
        last = group[-1]
        seeds = " ".join(map(str, sorted({r["seed"] for r in group})))
        examples = sorted({r.get("examples_per_step", 0) * r.get("updates", 0) for r in group
                           if r["status"] == "ok"})
        date = max((r.get("date", "") for r in group), default="")[:10] or "-"
        command = last.get("command") or "old compare.py (before the CLI-driven rework)"
        methods = ", ".join(w for w in REWARDS if any(r["reward"] == w for r in group))
        info.append(
            f"| {task} | {methods} | `{command}` | {date} | {last.get('commit', '-')}"
            f"{'+dirty' if last.get('dirty') else ''} | {seeds} | "
            f"{'/'.join(sorted({str(r.get('steps', '?')) for r in group}))} | "
            f"{'/'.join(map(str, examples)) if examples and examples != [0] else '-'} | "
            f"{last.get('machine', '-')} |")
    return lines, info


def untrained_mismatches(task: str, runs: list[dict], readouts: Readouts) -> list[str]:
    """Seeds whose methods' step-0 validations differ (the same generator should give the
    same numbers: a difference means the runs did not start alike)."""
    out = []
    for seed in sorted({r["seed"] for r in runs}):
        same = [r for r in runs if r["seed"] == seed and r["status"] == "ok"]
        for key, _ in readouts:
            values = [(r["reward"], r.get("untrained", {})[key]) for r in same
                      if key in r.get("untrained", {})]
            if not values:
                continue
            (first, v0), scale = values[0], 1e-6 * max(1.0, abs(values[0][1]))
            for reward, v in values[1:]:
                if abs(v - v0) > scale:
                    out.append(f"- {task} seed {seed}: untrained `{key}` differs between "
                               f"{first} and {reward} ({v0:.6g} vs {v:.6g})")
    return out


def write_report(rows: list[dict], path: Path, tasks: dict[str, Readouts]) -> None:
    """``tiny_compare.md`` from all rows: per task (in ``tasks`` order) its latest runs."""
    names = " | ".join(HEADER[w] for w in REWARDS)
    table = [f"| task | readout | better | untrained | {names} | wall s/run "
             f"({' / '.join(HEADER[w] for w in REWARDS)}) |",
             "| --- " * (5 + len(REWARDS)) + "|"]
    runs_table = ["| task | methods | command | date | commit | seeds | steps | examples/run | "
                  "machine |", "| --- " * 9 + "|"]
    failures, figures = [], []
    for task, readouts in tasks.items():
        runs = latest_runs(rows, task)
        if not runs:
            continue
        lines, info = task_lines(task, runs, readouts)
        table += lines
        runs_table += info
        failures += [f"- {task} {r['reward']} seed {r['seed']}: {r.get('error', '?')} "
                     f"(`{r.get('run_dir') or '-'}`)" for r in runs if r["status"] != "ok"]
        failures += untrained_mismatches(task, runs, readouts)
        if (path.parent / f"tiny_{task}.png").exists():
            figures.append(f"![{task}](tiny_{task}.png)")
    text = [
        "# DPG vs dataset-level reward vs per-example heuristics vs untrained generator "
        "(tiny CPU tasks)", "",
        "Written by `python -m studies.compare` from `tiny_compare.jsonl` (one row per run; each "
        "task's rows here are, per method, its latest runs). Each run is `python -m dpg_lightning "
        "fit --config configs/tiny/<task>.yaml --model.reward=<reward>` with every seed set to "
        "the run's seed; the heuristics (language task only) run `configs/tiny/language_"
        "<heuristic>.yaml` (`reward: example`: the paper's per-example baselines, no inner SFT "
        "per step; the fastText classifier is trained on the bundled English/Spanish sentences "
        "and the embedding model is the English-only all-MiniLM-L6-v2, see those configs). All "
        "methods of a seed run the same steps, prompts per step and samples per prompt (equal "
        "numbers of generated examples). *untrained* is the step-0 validation of the same seeds. "
        "Readouts are the last validation's: plain SFT of the initial target on "
        "a fixed-seed sample of the generator. mean ± std over seeds; wall time is the mean of "
        "the whole CLI call (model building and pretraining included).", "",
        *table, "", "Readouts: " + "; ".join(f"`{k}`: {v}" for k, v in MEANING.items()) + ".", "",
        "## Runs", "", *runs_table, "",
    ]
    if failures:
        text += ["## Failed runs and warnings", "", *failures, ""]
    if figures:
        text += ["## Figures", "", "Learning curves (mean and range over seeds); for 67 and QR "
                 "the patch drawn at the end (median seed) beside the target image.", "",
                 *figures, ""]
    path.write_text("\n".join(text))
