"""One DPG step broken down (rollout, inner SFT, attribution, policy update) and the tiny demo's
wall time, measured in one run on ``configs/tiny/l2_norm.yaml``.

Why this way: the breakdown must be of the step the demo really runs, so the module is built
from the YAML's ``model``/``data`` sections by the same jsonargparse machinery as the CLI, trained
a few steps by a Lightning ``Trainer``, and the shares are read from the module's own
``time/*`` metrics (``DPGModule.training_step`` times each phase) in the CSV log; a callback
times the whole step so the shares add up to a known total. Rollout throughput with and without
the KV cache is measured on the same generator by calling ``generate`` directly (the module
always uses the cache), on the same prompts and seed. The whole demo is
``python -m dpg_lightning fit --config configs/tiny/l2_norm.yaml`` in a subprocess, timed,
with its outputs redirected to a temporary directory.

Usage::

    python -m benchmarks.dpg_step                   # 12 steps + KV cache + whole demo
    python -m benchmarks.dpg_step --no-demo --steps 6
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.loggers import CSVLogger

from dpg_lightning.datamodule import PromptDataModule
from dpg_lightning.module import DPGModule

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/tiny/l2_norm.yaml"
PHASES = ("rollout", "inner_sft", "attribution", "policy_update")


def build(config: str) -> tuple[DPGModule, PromptDataModule, dict]:
    """The module and datamodule exactly as the CLI builds them from the YAML (no trainer)."""
    with open(config) as f:
        return build_from(yaml.safe_load(f))


def build_from(raw: dict) -> tuple[DPGModule, PromptDataModule, dict]:
    """:func:`build` from an already loaded (possibly edited) config."""
    parser = ArgumentParser()
    parser.add_class_arguments(DPGModule, "model")
    parser.add_class_arguments(PromptDataModule, "data")
    cfg = parser.parse_object({"model": raw["model"], "data": raw["data"]})
    init = parser.instantiate(cfg)
    return init.model, init.data, raw


class StepTimer(L.Callback):
    """Wall seconds of each whole training step (batch start to batch end)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def step_breakdown(config: str, steps: int, tmp: str) -> tuple[dict[str, float], int]:
    """Median seconds per phase over steps 2..N (step 1 pays one-off warm-up costs).

    Returns the medians (plus ``step`` and ``tokens``: completion tokens per step) and the
    number of steps they are over.
    """
    model, data, _ = build(config)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=CSVLogger(tmp, name="step"),
        log_every_n_steps=1,
        callbacks=[timer],
        inference_mode=False,
        check_val_every_n_epoch=None,
        val_check_interval=10**9,  # no validation: this measures training steps only
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("time/rollout")]
    n_texts = data.num_prompts * model.sampling.samples_per_prompt
    keep = rows[1:] if len(rows) > 1 else rows
    med = {k: statistics.median(float(r[f"time/{k}"]) for r in keep) for k in PHASES}
    med["tokens"] = statistics.median(
        float(r["train/completion_tokens"]) * n_texts for r in keep
    )
    med["step"] = statistics.median(timer.seconds[1:] if len(timer.seconds) > 1 else timer.seconds)
    return med, len(keep)


@torch.no_grad()
def kv_cache(config: str, new_tokens: list[int], repeats: int) -> list[tuple[int, float, float]]:
    """Generated tokens/s of the demo's generator with and without the KV cache.

    Every row is forced to ``n`` new tokens (``min_new_tokens``) so both settings do the same
    work; the fastest of ``repeats`` interleaved runs is kept (the box is shared).
    """
    model, data, _ = build(config)
    data.setup("fit")
    prompts = next(iter(data.train_dataloader()))
    tok, gen, s = model.gen_tokenizer, model.generator.eval(), model.sampling
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = enc["input_ids"].repeat_interleave(s.samples_per_prompt, 0)
    mask = enc["attention_mask"].repeat_interleave(s.samples_per_prompt, 0)
    out = []
    for n in new_tokens:
        best = {True: float("inf"), False: float("inf")}
        for _ in range(repeats):
            for cache in (True, False):
                torch.manual_seed(0)
                start = time.perf_counter()
                res = gen.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, temperature=s.temperature,
                    top_p=s.top_p, top_k=0, max_new_tokens=n, min_new_tokens=n,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    use_cache=cache,
                )
                best[cache] = min(best[cache], time.perf_counter() - start)
                assert res.shape[1] - ids.shape[1] == n
        total = n * ids.shape[0]
        out.append((n, total / best[True], total / best[False]))
    return out


def whole_demo(config: str, tmp: str) -> float:
    """Wall seconds of the full demo run as a user runs it (outputs sent to ``tmp``)."""
    cmd = [
        sys.executable, "-m", "dpg_lightning", "fit", "--config", config,
        f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp}",
        "--trainer.enable_progress_bar=false",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"demo failed:\n{proc.stderr[-3000:]}")
    return wall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--steps", type=int, default=12, help="training steps timed (first dropped)")
    p.add_argument("--new-tokens", default="32,128", help="KV-cache comparison lengths")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (here and in the demo)")
    p.add_argument("--no-demo", action="store_true", help="skip the whole-demo run")
    args = p.parse_args(argv)
    os.chdir(ROOT)  # the YAML's prompt_file is relative to the repository root
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    print(
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s), "
        f"{args.config}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        med, n = step_breakdown(args.config, args.steps, tmp)
        kv = kv_cache(args.config, [int(x) for x in args.new_tokens.split(",")], args.repeats)
        demo = None if args.no_demo else whole_demo(args.config, tmp)

    step = med["step"]
    print(f"\n### DPG step breakdown (median of {n} steps)\n")
    print("| phase | seconds | share of step |\n|---|---|---|")
    for k in PHASES:
        print(f"| {k} | {med[k]:.3f} | {med[k] / step:.1%} |")
    other = step - sum(med[k] for k in PHASES)
    print(f"| other (tokenize, advantages, logging) | {other:.3f} | {other / step:.1%} |")
    print(f"| **whole step** | {step:.3f} | 100% |")
    print(
        f"\nattribution / inner SFT = {med['attribution'] / med['inner_sft']:.2f}; "
        f"(inner SFT + attribution) / step = "
        f"{(med['inner_sft'] + med['attribution']) / step:.1%}; "
        f"rollout: {med['tokens']:.0f} completion tokens/step, "
        f"{med['tokens'] / med['rollout']:.0f} tokens/s (KV cache on, stops at eos)"
    )
    print("\n### Rollout throughput, KV cache on vs off (every row forced to n new tokens)\n")
    print("| new tokens | tok/s cache | tok/s no cache | cache speed-up |\n|---|---|---|---|")
    for n_tok, on, off in kv:
        print(f"| {n_tok} | {on:.0f} | {off:.0f} | {on / off:.2f}x |")
    if demo is not None:
        with open(args.config) as f:
            max_steps = yaml.safe_load(f)["trainer"]["max_steps"]
        print(
            f"\n### Whole tiny demo\n\nwall {demo:.1f} s for {max_steps} steps "
            f"({demo / max_steps:.2f} s/step incl. start-up, validation, checkpoints); "
            f"timed steps account for {max_steps * step / demo:.0%} of it"
        )


if __name__ == "__main__":
    main()
