"""The generator's lr schedule (``model.policy.lr_schedule``, ``warmup_steps``,
``min_lr_ratio``): transformers' schedules over DPG steps, checked settings, logged as
``train/lr`` at each DPG step, checkpointed and resumed exactly."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from dpg_lightning.cli import main
from dpg_lightning.common.errors import ConfigError
from dpg_lightning.dpg.lr_schedule import lr_scheduler
from dpg_lightning.dpg.policy import PolicyConfig
from tests.helpers import ROOT, TINY_CONFIG, tiny_fit_config


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"warmup_steps": -1}, "warmup_steps"), ({"warmup_steps": 1.5}, "warmup_steps"),
     ({"lr_schedule": "cosine", "min_lr_ratio": 1.5}, "min_lr_ratio"),
     ({"lr_schedule": "linear", "min_lr_ratio": 0.1}, "min_lr_ratio"),
     ({"lr_schedule": "step"}, "lr_schedule")],
)
def test_policy_rejects_bad_schedule_settings(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        PolicyConfig(**kwargs)


def _lrs(schedule: str, warmup: int, total: int, min_ratio: float = 0.0) -> list[float]:
    """The lr of each of ``total`` DPG steps: read before each step, stepped after it."""
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = lr_scheduler(opt, schedule, warmup, total, min_ratio)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_warm_up_then_hold_or_decay():
    assert _lrs("constant", 0, 3) == [2.0, 2.0, 2.0]
    assert _lrs("constant", 2, 4) == [0.0, 1.0, 2.0, 2.0]
    cosine = _lrs("cosine", 1, 5, 0.1)
    expected = [0.0] + [2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)))
                        for k in range(4)]
    assert cosine == pytest.approx(expected, rel=1e-12, abs=0)
    assert _lrs("linear", 0, 4) == pytest.approx([2.0, 1.5, 1.0, 0.5], rel=1e-12)


def test_decaying_schedule_needs_max_steps():
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        lr_scheduler(opt, "cosine", 0, -1)
    with pytest.raises(ConfigError, match="warmup_steps"):
        lr_scheduler(opt, "linear", 5, 3)
    lr_scheduler(opt, "constant", 5, -1)  # constant needs no length


class StopAt(L.Callback):
    """Stop a run after ``step`` DPG steps without changing ``max_steps`` (the schedule's
    length): an interrupted run, resumed below."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *_: object) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


POLICY = {"lr_schedule": "cosine", "warmup_steps": 1, "min_lr_ratio": 0.1}


def _config(tmp: Path, name: str, stop_at: int | None = None) -> Path:
    policy = yaml.safe_load((ROOT / TINY_CONFIG).read_text())["model"]["policy"]
    path = tiny_fit_config(tmp, name, 4, policy={**policy, **POLICY, "lr": 0.01})
    if stop_at is not None:
        cfg = yaml.safe_load(path.read_text())
        cfg["trainer"]["callbacks"].append(
            {"class_path": "tests.test_lr_schedule.StopAt", "init_args": {"step": stop_at}})
        path.write_text(yaml.safe_dump(cfg))
    return path


def _train_rows(run: Path) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    with (run / "csv" / "version_0" / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value and key.startswith("train/") and not key.startswith("train/time"):
                    rows.setdefault(int(row["step"]), {})[key] = float(value)
    return rows


def _state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)


def test_schedule_resumes_exactly(tmp_path):
    """4 steps straight and 2 + a resume of 2 give the same lr at every step, the same
    metrics and the same generator; the lr follows the cosine schedule over DPG steps."""
    main(["fit", "--config", str(_config(tmp_path, "straight"))])
    main(["fit", "--config", str(_config(tmp_path, "resumed", stop_at=2))])
    resumed = tmp_path / "resumed"
    assert sorted(p.name for p in (resumed / "ckpt").glob("*.ckpt")) == ["step1.ckpt",
                                                                         "step2.ckpt"]
    main(["fit", "--config", str(_config(tmp_path, "resumed")),
          "--ckpt_path", str(resumed / "ckpt" / "step2.ckpt")])
    a, b = _train_rows(tmp_path / "straight"), _train_rows(resumed)
    lrs = [a[step]["train/lr"] for step in (1, 2, 3, 4)]
    expected = [0.0] + [0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 3)))
                        for k in range(3)]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=0)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == a[step], step
    sa, sb = (_state(run / "ckpt" / "step4.ckpt") for run in (tmp_path / "straight", resumed))
    assert sa["lr_schedulers"][0]["last_epoch"] == sb["lr_schedulers"][0]["last_epoch"] == 4
    for key, value in sa["state_dict"].items():
        if key.startswith("generator."):
            torch.testing.assert_close(sb["state_dict"][key], value, rtol=0, atol=0, msg=key)
