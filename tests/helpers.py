"""Helpers the tests share (plain functions and constants; pytest fixtures live in conftest.py).

Tests import from here, never from ``conftest`` or from another test file.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from dpg_lightning.inner import run_sft
from dpg_lightning.inner.optim import InnerOptimConfig
from dpg_lightning.models.build import ModelConfig, build_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]

TEXTS = ["hello world", "abc", "the cat sat", "zz top", "qwerty!", "a"]
#: Inner optimizers the metagradient tests run; files parametrize over the subsets they need.
OPTIMS = {
    "sgd": InnerOptimConfig("sgd", lr=0.5),
    "sgd_momentum": InnerOptimConfig("sgd", lr=0.2, momentum=0.9, weight_decay=0.01),
    "adam": InnerOptimConfig("adam", lr=1e-2, eps_root=1e-8, weight_decay=0.01),
    "adamw": InnerOptimConfig("adamw", lr=1e-2, eps_root=1e-8, weight_decay=0.1),
}


def tiny(arch: str = "gpt2", dtype: str = "float64", **kw):
    """A tiny frozen target (the inner loop never trains the module in place)."""
    cfg = ModelConfig(
        arch=arch,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        dtype=dtype,
        **kw,
    )
    return build_model(cfg, len(load_tokenizer(cfg))).requires_grad_(False)


def finite_difference_rewards(target, data, phi, cfg, order, h=1e-5):
    """Central differences of Phi(SFT(eps)) per example, re-running the real (plain) SFT."""
    out = []
    for i in range(len(data)):
        values = []
        for sign in (1.0, -1.0):
            eps = torch.ones(len(data), dtype=torch.float64)
            eps[i] += sign * h
            values.append(run_sft(target, data, eps, phi, cfg, order, create_graph=False)[0])
        out.append((values[0] - values[1]) / (2 * h))
    return torch.stack(out).detach()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the denominator floored at 1e-300, so b == 0 gives no NaN)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# ---------------------------------------------------------------- tiny fits

#: The embedded tiny config every tiny fit starts from (a path relative to the repo root).
TINY_CONFIG = "configs/tiny/l2_norm.yaml"
#: What shrinks a fit of the tiny config to seconds, as dotted config keys. The CLI form is
#: ``tiny_fit_args``; ``tiny_fit_config`` writes the same into a config file. The progress bar
#: comes first: commands that are not fits (export, sample) take ``tiny_fit_args()[1:]``.
TINY_FIT = {
    "trainer.enable_progress_bar": False,
    "model.sampling.max_new_tokens": 8,
    "model.sampling.samples_per_prompt": 2,
    "data.num_prompts": 2,
    "data.val_num_prompts": 2,
    "model.inner.batch_size": 2,
}


def _cli_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def tiny_fit_args(*extra: str, root: Path | None = None) -> list[str]:
    """CLI arguments (after ``fit --config TINY_CONFIG``) for a tiny fit: ``TINY_FIT``, then
    the caller's ``extra``, then, given ``root``, the run directory and the logger's save_dir."""
    args = [f"--{key}={_cli_value(value)}" for key, value in TINY_FIT.items()]
    args += extra
    if root is not None:
        args += [f"--trainer.default_root_dir={root}",
                 f"--trainer.logger.init_args.save_dir={root}"]
    return args


def tiny_fit_config(tmp: Path, name: str, max_steps: int, **model_overrides) -> Path:
    """The tiny config, shrunk to seconds, checkpointing every step under ``tmp/name``."""
    cfg = yaml.safe_load((ROOT / TINY_CONFIG).read_text())
    run = tmp / name
    cfg["trainer"].update(
        max_steps=max_steps,
        val_check_interval=1000,
        log_every_n_steps=1,
        default_root_dir=str(run),
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run), "name": "csv", "version": 0}},
        callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run / "ckpt"), "every_n_train_steps": 1,
                                  "save_top_k": -1, "filename": "step{step}",
                                  "auto_insert_metric_name": False}}],
    )
    for key, value in TINY_FIT.items():
        *sections, last = key.split(".")
        node = cfg
        for section in sections:
            node = node[section]
        node[last] = value
    model = cfg["model"]
    for m in ("generator", "target"):
        model[m].update(hidden_size=32, intermediate_size=64, num_layers=1)
    model["inner"].update(max_length=16)
    model.update(model_overrides)
    cfg["data"].update(prompt_file=str(ROOT / "configs/tiny/prompts.txt"))
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def piped_fit(root: Path, *args: str, timeout: float = 600) -> list[str]:
    """The stdout lines of ``python -m dpg_lightning fit <args>`` with stdout to a pipe (as
    under Slurm, so it prints progress lines, not a bar), its files under ``root``, one torch
    thread; fails the test on a non-zero exit, and kills the fit by its pid if it overruns."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpg_lightning", "fit", *args,
         f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}"],
        cwd=ROOT, env={**os.environ, "DPG_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    return out.splitlines()


#: A progress line of a DPG step in a log (``dpg_lightning.run.progress.step_line``).
STEP_LINE = re.compile(r"^\[dpg\] step (\d+)/(\d+) \| .*\| eta \d+:\d\d:\d\d$")


def logged_steps(lines: list[str]) -> list[tuple[int, int]]:
    """(k, N) of every ``[dpg] step k/N`` progress line in ``lines``."""
    return [(int(m[1]), int(m[2])) for line in lines if (m := STEP_LINE.match(line))]


def val_phi_by_step(root: Path) -> dict[int, float]:
    """``{step: val/phi}`` of the run's ``metrics.csv`` under ``root``, in step order."""
    with next(root.rglob("metrics.csv")).open(newline="") as f:
        rows = [(int(r["step"]), float(r["val/phi"])) for r in csv.DictReader(f)
                if r.get("val/phi")]
    return dict(sorted(rows))
