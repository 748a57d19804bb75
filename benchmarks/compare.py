"""DPG vs the dataset-level reward vs the untrained generator, on the tiny tasks, over seeds.

For each task (a tiny config) and seed, two runs with the *same* number of generated examples
(same steps, prompts per step and samples per prompt): ``reward: dpg`` and ``reward: dataset``.
The untrained generator is the step-0 validation of the same seed (logged before any update).
The readout is the task's human-facing number after plain SFT of a fresh target on a fixed-seed
sample of the generator (``DPGModule.evaluate``). Writes a Markdown table (mean ± std over seeds)
and a plot of the readout over steps.

    python benchmarks/compare.py --tasks sixty_seven l2_norm --seeds 0 1 2 --steps 150

Runs are built in Python from the YAML (not through the CLI) so the benchmark can bind the
target tokenizer to text objectives and pretrain the language proxy's models itself; it does
the same work as ``python -m dpg_lightning fit --config configs/tiny/<task>.yaml``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpg_lightning.data import PromptDataModule  # noqa: E402
from dpg_lightning.inner import InnerConfig, InnerOptimConfig, trainable_names  # noqa: E402
from dpg_lightning.models import ModelConfig, load_tokenizer  # noqa: E402
from dpg_lightning.module import DPGModule  # noqa: E402
from dpg_lightning.objectives import check_objective  # noqa: E402
from dpg_lightning.policy import PolicyConfig  # noqa: E402
from dpg_lightning.pretrain import pretrain, read_texts  # noqa: E402
from dpg_lightning.rollout import SamplingConfig, sample_rollout  # noqa: E402

#: task -> (config, readout key, "higher"/"lower" is better)
TASKS: dict[str, tuple[str, str, str]] = {
    "sixty_seven": ("configs/tiny/sixty_seven.yaml", "pixel_accuracy", "higher"),
    "qr": ("configs/tiny/qr.yaml", "pixel_accuracy", "higher"),
    "l2_norm": ("configs/tiny/l2_norm.yaml", "lm_head_norm", "lower"),
    "uuid": ("configs/tiny/uuid.yaml", "sequence_loss", "lower"),
    "language": ("configs/tiny/language.yaml", "last_word_loss", "lower"),
}
PRETRAIN_KEYS = ("pretrain_files", "pretrain_steps", "pretrain_lr")


def _model_config(d: dict) -> tuple[ModelConfig, dict]:
    d = dict(d)
    extra = {k: d.pop(k) for k in PRETRAIN_KEYS if k in d}
    return ModelConfig(**d), extra


def _instantiate(spec: dict):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def build_run(cfg: dict, reward: str, seed: int) -> tuple[DPGModule, PromptDataModule]:
    """The module and data of one run of ``cfg`` (a loaded tiny YAML) at ``seed``."""
    m = copy.deepcopy(cfg["model"])
    gen_cfg, gen_pre = _model_config(m.get("generator", {}))
    tgt_cfg, tgt_pre = _model_config(m.get("target", {}))
    gen_cfg.seed = seed  # a different initial generator per seed; the target stays fixed
    metric = _instantiate(m["metric"])
    metric.bind_tokenizer(load_tokenizer(tgt_cfg))
    inner = dict(m.get("inner", {}))
    optim = dict(inner.pop("optim", {}))
    if "betas" in optim:
        optim["betas"] = tuple(optim["betas"])
    policy = dict(m.get("policy", {}))
    if "betas" in policy:
        policy["betas"] = tuple(policy["betas"])
    module = DPGModule(
        generator=gen_cfg,
        target=tgt_cfg,
        metric=metric,
        inner=InnerConfig(optim=InnerOptimConfig(**optim), **inner),
        sampling=SamplingConfig(**m.get("sampling", {})),
        policy=PolicyConfig(**policy),
        reward=reward,
        seed=seed,
    )
    if gen_pre or tgt_pre:
        # The language proxy: pretrain in-process, then redo the objective's start-up checks
        # on the pretrained target (they ran on the random one inside DPGModule.__init__).
        for model, tok, pre, s in (
            (module.generator, module.gen_tokenizer, gen_pre, seed),
            (module.target, module.target_tokenizer, tgt_pre, 1000),
        ):
            if pre.get("pretrain_files") and pre.get("pretrain_steps"):
                texts = read_texts(pre["pretrain_files"])
                pretrain(model, tok, texts, pre["pretrain_steps"], pre.get("pretrain_lr", 3e-3), s)
        module.metric.setup(module.target)
        names = trainable_names(module.target, module.inner.train_params)
        module.phi_initial = check_objective(module.metric, module.target, names)
    d = dict(cfg["data"])
    d["seed"] = seed
    return module, PromptDataModule(**d)


def language_share(texts: list[str], source: list[str], new: list[str], n: int = 3) -> float:
    """Share of ``texts`` that a character n-gram naive Bayes assigns to the ``new`` language.

    Trained on the two bundled corpora; a crude detector, but the same one for every method.
    """
    import math
    from collections import Counter

    def grams(text: str) -> list[str]:
        t = f" {text.lower()} "
        return [t[i : i + n] for i in range(len(t) - n + 1)]

    counts = [Counter(g for line in corpus for g in grams(line)) for corpus in (source, new)]
    totals = [sum(c.values()) + 1 for c in counts]
    vocab = len(set(counts[0]) | set(counts[1])) + 1
    votes = []
    for text in texts:
        score = [
            sum(math.log((c[g] + 1) / (tot + vocab)) for g in grams(text))
            for c, tot in zip(counts, totals, strict=True)
        ]
        votes.append(score[1] > score[0])
    return sum(votes) / max(len(votes), 1)


def generator_language_share(module: DPGModule, prompts: list[str], seed: int) -> float:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 777)
        rollout = sample_rollout(module.generator, module.gen_tokenizer, prompts, module.sampling)
    en = read_texts(str(ROOT / "configs/tiny/data/en.txt"))
    es = read_texts(str(ROOT / "configs/tiny/data/es.txt"))
    return language_share(rollout.texts, en, es)


def run_one(task: str, reward: str, seed: int, steps: int, val_every: int, out: Path) -> dict:
    """Train one run; returns ``{"curve": [(step, readout)], "final":..., "initial":...}``."""
    config, key, _ = TASKS[task]
    cfg = yaml.safe_load((ROOT / config).read_text())
    L.seed_everything(seed, workers=True, verbose=False)
    module, data = build_run(cfg, reward, seed)
    val_prompts = next(iter(data.val_dataloader()))
    extra: dict[str, float] = {}
    if task == "language":
        extra["share_initial"] = generator_language_share(module, val_prompts, seed)
    logger = CSVLogger(out, name=f"{task}_{reward}_s{seed}")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        inference_mode=False,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    curve = [(int(r["step"]), float(r[f"val/{key}"])) for r in rows if r.get(f"val/{key}")]
    if task == "language":
        extra["share_final"] = generator_language_share(module, val_prompts, seed)
    return {
        "task": task, "reward": reward, "seed": seed, "key": key, "curve": curve,
        "initial": curve[0][1], "final": curve[-1][1], "seconds": time.perf_counter() - start,
        **extra,
    }


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def write_report(results: list[dict], out: Path, steps: int | str, note: str) -> None:
    """Markdown table (mean ± std over seeds) and a plot of the readout curves."""
    lines = [
        "# DPG vs dataset-level reward vs untrained generator (tiny CPU tasks)",
        "",
        f"{steps} generator steps per run; same prompts per step and samples per prompt for both "
        "rewards (equal numbers of generated examples). Readout after plain SFT of the initial "
        "target on a fixed-seed validation sample. mean ± std over seeds. " + note,
        "",
        "| task | readout | better | untrained | dataset reward | DPG | seeds | steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in TASKS:
        rs = [r for r in results if r["task"] == task]
        if not rs:
            continue
        _, key, better = TASKS[task]
        dpg = [r for r in rs if r["reward"] == "dpg"]
        ds = [r for r in rs if r["reward"] == "dataset"]
        untrained = [r["initial"] for r in dpg or ds]
        seeds = sorted({r["seed"] for r in rs})
        n_steps = "/".join(sorted({str(r["curve"][-1][0] + 1) for r in rs}))
        lines.append(
            f"| {task} | {key} | {better} | {_fmt(untrained)} | {_fmt([r['final'] for r in ds])} "
            f"| {_fmt([r['final'] for r in dpg])} | {len(seeds)} | {n_steps} |"
        )
        if task == "language":
            for name, group in (("dataset", ds), ("dpg", dpg)):
                if group:
                    lines.append(
                        f"| language | share in new language ({name}) | higher | "
                        f"{_fmt([r['share_initial'] for r in group])} | "
                        f"{_fmt([r['share_final'] for r in group]) if name == 'dataset' else '-'}"
                        f" | {_fmt([r['share_final'] for r in group]) if name == 'dpg' else '-'}"
                        f" | {len(group)} | |"
                    )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tasks = [t for t in TASKS if any(r["task"] == t for r in results)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for r in (r for r in results if r["task"] == task):
            steps_, values = zip(*r["curve"], strict=True)
            color = "tab:blue" if r["reward"] == "dpg" else "tab:orange"
            ax.plot(steps_, values, color=color, alpha=0.7, label=r["reward"])
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys())
        ax.set_title(task)
        ax.set_xlabel("generator step")
        ax.set_ylabel(TASKS[task][1])
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--rewards", nargs="+", default=["dpg", "dataset"], choices=["dpg", "dataset"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--val-every", type=int, default=25)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/compare")
    ap.add_argument("--note", default="")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from results")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.jsonl"
    done = [json.loads(line) for line in results_file.read_text().splitlines()] if (
        results_file.exists()
    ) else []
    if args.report_only:
        steps = sorted({r["curve"][-1][0] + 1 for r in done})
        write_report(done, args.out, "/".join(map(str, steps)), args.note)
        return
    for task in args.tasks:
        for seed in args.seeds:
            for reward in args.rewards:
                if any(
                    (r["task"], r["reward"], r["seed"], len(r["curve"]) and r["curve"][-1][0])
                    == (task, reward, seed, args.steps - 1)
                    for r in done
                ):
                    continue
                result = run_one(task, reward, seed, args.steps, args.val_every, args.out)
                done.append(result)
                with results_file.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
                write_report(done, args.out, args.steps, args.note)
    write_report(done, args.out, args.steps, args.note)


if __name__ == "__main__":
    main()
