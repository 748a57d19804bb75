"""How faithful is DPG's reward? (a) DPG's expected update against the exact generator gradient
on an enumerable case, as the inner lr, the inner steps and the set size vary; (b) exact and
first-order rewards against exact leave-one-out on a setup shaped like
``configs/tiny/l2_norm.yaml``, with the cost of the first-order reward against ``replay``.

    python -m studies.reward_fidelity            # writes studies/results/reward_fidelity.*

Everything runs on one torch thread; the analysis lives in ``dpg_lightning/analysis/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from dpg_lightning.analysis.agreement import agreement
from dpg_lightning.analysis.enumerated import compare_gradients, evaluate_sets
from dpg_lightning.analysis.inner_calls import exact_rewards, first_order
from dpg_lightning.analysis.leave_one_out import as_float64, leave_one_out
from dpg_lightning.data.tokenization import tokenize_examples
from dpg_lightning.inner import InnerConfig, InnerOptimConfig, inner_order
from dpg_lightning.metrics.l2_norm import LMHeadL2Norm
from dpg_lightning.models.build import ModelConfig, build_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "studies" / "results"
CANDIDATES = ["hello world", "abc", "zz top", "the cat sat"]
LOGITS = [0.5, -0.3, 0.2, 0.0]


def _target(hidden: int, layers: int, heads: int, inter: int, seed: int) -> torch.nn.Module:
    cfg = ModelConfig(arch="gpt2", hidden_size=hidden, num_layers=layers, num_heads=heads,
                      intermediate_size=inter, init_std=0.2, seed=seed)
    return build_model(cfg, len(load_tokenizer(cfg))).requires_grad_(False)


def enumerated_grid(lrs: list[float], steps: list[int], ns: list[int], seed: int) -> list[dict]:
    """(a): full-batch SGD, 4 candidates, tiny target (hidden 16, 2 layers), L2-norm Phi."""
    tok = load_tokenizer(ModelConfig())
    target = _target(16, 2, 2, 32, seed)
    cands = tokenize_examples(CANDIDATES, tok, 32)
    fns = {"dpg": exact_rewards, "first_order": first_order}
    rows = []
    for n in ns:
        for t in steps:
            for lr in lrs:
                start = time.perf_counter()
                cfg = InnerConfig(optim=InnerOptimConfig("sgd", lr=lr), backend="func")
                values = evaluate_sets(target, cands, LMHeadL2Norm(), cfg, n, t, reward_fns=fns)
                cmp = compare_gradients(torch.tensor(LOGITS), values)
                row = dict(n=n, steps=t, lr=lr, grad_j_norm=float(cmp.true_gradient.norm()),
                           wall_s=round(time.perf_counter() - start, 2))
                for name, est in cmp.estimators.items():
                    row[name] = dict(cosine=est.cosine, relative_error=est.relative_error,
                                     variance=est.variance)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def _timed(fn) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def config_like(optim: InnerOptimConfig, seed: int, repeats: int) -> dict:
    """(b): the tiny config's target (gpt2 64x2, init_std 0.2, seed 1), 32 examples, inner
    batch 8 (4 steps), max_length 64; LOO and rewards on a float64 copy, timings in float32."""
    tok = load_tokenizer(ModelConfig())
    texts = (ROOT / "configs/tiny/prompts.txt").read_text().splitlines()[:32]
    target = _target(64, 2, 4, 128, 1)
    cfg = InnerConfig(optim=optim, batch_size=8, max_length=64, backend="replay")
    data = cfg.tokenize(texts, tok)
    order = inner_order(len(data), 8, True, seed)
    phi = LMHeadL2Norm()
    start = time.perf_counter()
    loo = leave_one_out(target, data, phi, cfg, order)
    loo_s = time.perf_counter() - start
    t64 = as_float64(target)
    exact, _, _ = exact_rewards(t64, data, phi, cfg, order)
    first, _, _ = first_order(t64, data, phi, cfg, order)
    times: dict[str, list[tuple[float, float]]] = {"replay": [], "first_order": []}
    for _ in range(repeats):  # interleaved; each keeps its fastest
        times["replay"].append(_timed(lambda: exact_rewards(target, data, phi, cfg, order))[1:])
        times["first_order"].append(
            _timed(lambda: first_order(target, data, phi, cfg, order))[1:])
    best = {k: min(v, key=lambda x: x[1]) for k, v in times.items()}
    out = dict(
        optim=optim.name, lr=optim.lr, examples=len(data), steps=len(order),
        loo_floor=loo.floor, loo_min_abs=float(loo.differences.abs().min()),
        loo_wall_s=round(loo_s, 2),
        exact_vs_loo=agreement(exact, loo.differences).__dict__,
        first_order_vs_loo=agreement(first, loo.differences).__dict__,
        first_order_vs_exact=agreement(first, exact).__dict__,
        cost={k: dict(wall_s=round(w, 3), cpu_s=round(c, 3)) for k, (w, c) in best.items()},
        cpu_ratio_first_order_over_replay=best["first_order"][1] / best["replay"][1],
        rewards=exact.tolist(), first_order=first.tolist(), leave_one_out=loo.differences.tolist(),
    )
    print(json.dumps({k: v for k, v in out.items()
                      if k not in ("rewards", "first_order", "leave_one_out")}), flush=True)
    return out


def figure(grid: list[dict], cases: list[dict]) -> Figure:
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax_cos, ax_err, ax_sc = fig.subplots(1, 3)
    for n in sorted({r["n"] for r in grid}):
        for t in sorted({r["steps"] for r in grid}):
            rows = sorted((r for r in grid if r["n"] == n and r["steps"] == t),
                          key=lambda r: r["lr"])
            lrs = [r["lr"] for r in rows]
            for name, ls in (("dpg", "-"), ("first_order", ":")):
                label = f"{name} n={n} T={t}"
                ax_cos.plot(lrs, [1 - r[name]["cosine"] for r in rows], ls, marker="o",
                            label=label)
                ax_err.plot(lrs, [r[name]["relative_error"] for r in rows], ls, marker="o",
                            label=label)
    for ax, what in ((ax_cos, "1 - cosine(E[update], grad J)"),
                     (ax_err, "||E[update] - grad J|| / ||grad J||")):
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("inner SGD lr (full-batch steps)"), ax.set_ylabel(what)
    ax_err.legend(fontsize=6)
    ax_cos.set_title("(a) enumerated generator, 4 candidates")
    case = cases[0]
    ax_sc.scatter(case["rewards"], case["leave_one_out"], s=12, label="exact r_i")
    ax_sc.scatter(case["first_order"], case["leave_one_out"], s=12, marker="x",
                  label="first-order r_i")
    lo = min(case["leave_one_out"] + case["rewards"])
    hi = max(case["leave_one_out"] + case["rewards"])
    ax_sc.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax_sc.set_xlabel("reward"), ax_sc.set_ylabel("leave-one-out Phi(D) - Phi(D, eps_i=0)")
    ax_sc.set_title(f"(b) tiny-config-like, {case['optim']} lr {case['lr']}")
    ax_sc.legend(fontsize=7)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1.0, 0.3, 0.03, 0.003])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--ns", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "reward_fidelity")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    grid = enumerated_grid(args.lrs, args.steps, args.ns, args.seed)
    cases = [config_like(InnerOptimConfig("sgd", lr=0.3), args.seed, args.repeats),
             config_like(InnerOptimConfig("adam", lr=1e-3, eps_root=1e-8), args.seed,
                         args.repeats)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    settings = dict(seed=args.seed, commit=commit, torch=torch.__version__, threads=1,
                    machine=platform.machine(), wall_s=round(time.perf_counter() - start, 1),
                    logits=LOGITS, candidates=CANDIDATES)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(
        json.dumps(dict(settings=settings, grid=grid, config_like=cases), indent=1) + "\n")
    figure(grid, cases).savefig(f"{args.out}.png", dpi=120)
    print(json.dumps(settings))


if __name__ == "__main__":
    main()
