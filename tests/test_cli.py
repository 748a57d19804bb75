"""The user interface: `python -m dpg_lightning fit --config ...` and its start-up errors."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpg_lightning.cli import main
from tests.helpers import TINY_CONFIG, tiny_fit_args

CONFIG = TINY_CONFIG


def _fast(tmp_path: Path) -> list[str]:
    return tiny_fit_args("--trainer.max_steps=2", "--trainer.val_check_interval=2", root=tmp_path)


@pytest.mark.slow
def test_fit_subprocess_writes_checkpoint_and_reports_paths(tmp_path):
    cmd = [sys.executable, "-m", "dpg_lightning", "fit", "--config", CONFIG, *_fast(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert any(c.name == "last.ckpt" for c in ckpts), ckpts
    assert "checkpoints:" in proc.stdout and "run directory:" in proc.stdout
    state = torch.load(next(c for c in ckpts if c.name == "last.ckpt"), weights_only=False)
    assert state["global_step"] == 2
    assert any(k.startswith("generator.") for k in state["state_dict"])
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "val/phi" in metrics and "train/reward_mean" in metrics


def test_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: dpg_lightning.metrics.l2_norm.LMHeadL2Norm" in out and "inner:" in out


def test_unknown_key_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, "--model.inner.learning_rate=0.1"])
    assert exit_info.value.code != 0
    assert "learning_rate" in capsys.readouterr().err


def test_nonfinite_rewards_skip_the_update_and_training_goes_on(tmp_path, monkeypatch):
    import dpg_lightning.dpg.step as dpg_step
    import dpg_lightning.module as module
    from dpg_lightning.inner import Attribution

    def nan_rewards(target, data, phi, cfg, order, progress=None):
        n = len(data)
        return Attribution(torch.full((n,), float("nan")), torch.tensor(0.0), [torch.tensor(0.0)])

    monkeypatch.setattr(dpg_step, "metagradient_rewards", nan_rewards)
    cli = main(["fit", "--config", CONFIG, *_fast(tmp_path)])
    initial = module.DPGModule(
        generator=cli.model.gen_cfg, target=cli.model.target_cfg, inner=cli.model.inner
    )
    for a, b in zip(cli.model.generator.parameters(), initial.generator.parameters()):
        assert torch.equal(a, b)  # no update was applied
    # Every step ran, was skipped and counted (a skipped update still steps the optimizer).
    assert cli.trainer.global_step == 2
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    skipped = [r["step"] for r in rows if r.get("train/skipped_nonfinite")]
    assert skipped == ["1", "2"], rows  # at the DPG steps they were


@pytest.mark.slow
def test_a_fit_opens_without_lightning_noise(tmp_path):
    """Lightning's messages about things a DPG run does on purpose (models in eval mode, the
    module's own progress bar and model table in place of Lightning's) or that are Lightning's
    own business (litlogger, its internal deprecations) stay out of the output, and the model
    table has no mode or FLOPs column (all modules are in eval mode on purpose; FLOPs read 0);
    the filters are the CLI's, so the subprocess sees what a user sees."""
    pytest.importorskip("wandb")
    cmd = [sys.executable, "-m", "dpg_lightning", "fit", "--config", CONFIG,
           *tiny_fit_args("--trainer.max_steps=1", "--trainer.val_check_interval=1",
                          root=tmp_path)]
    wandb = ["--trainer.logger+=lightning.pytorch.loggers.WandbLogger",
             "--trainer.logger.offline=true"]
    env = {**os.environ, "PYTHONWARNINGS": "", "WANDB_MODE": "offline"}
    proc = subprocess.run([*cmd, *wandb], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "wandb" in output  # W&B started (its own deprecation notices count as noise)
    for noise in ("in eval mode", "litlogger", "LeafSpec", "will override existing callbacks",
                  "FLOPs", "Flops", "train mode", "anonymous setting"):
        assert noise not in output, (noise, output)
    assert not re.search(r"\bMode\b", output), output
    assert "generator" in output and "Total params" in output  # the table itself stays
    # a resume writes on into its own checkpoint directory, which is not empty on purpose
    # (without W&B: a W&B service can hold the run's id for a moment after its process ends)
    resume = subprocess.run([*cmd, "--trainer.max_steps=2", "--ckpt_path=last"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert "resuming" in resume.stderr
    assert "exists and is not empty" not in resume.stdout + resume.stderr, resume.stderr


def test_wandb_writes_into_the_run_directory(tmp_path, monkeypatch):
    """A WandbLogger whose config sets no save_dir logs into the run directory, not ./wandb
    of wherever the command started (checked on the built trainer: W&B starts lazily)."""
    pytest.importorskip("wandb")
    import dpg_lightning.cli as cli_module

    monkeypatch.setenv("WANDB_MODE", "offline")
    seen = {}

    def stop(self, subcommand):  # the classes are built; the fit itself is not needed
        seen["trainer"] = self.trainer

    monkeypatch.setattr(cli_module.DPGCLI, "_run_subcommand", stop)
    main(["fit", "--config", CONFIG, *tiny_fit_args(root=tmp_path),
          "--trainer.logger+=lightning.pytorch.loggers.WandbLogger",
          "--trainer.logger.offline=true"])
    trainer = seen["trainer"]
    wandb_logger = next(lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger")
    assert wandb_logger.save_dir == trainer.log_dir
    assert Path(trainer.log_dir).is_relative_to(tmp_path)
    assert wandb_logger._wandb_init["dir"] == trainer.log_dir
