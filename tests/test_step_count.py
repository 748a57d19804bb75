"""Issue 22, point 5: one step count users see, the DPG step, from one origin.

A step's metrics and the validation after it are logged at the number of DPG steps done (1 for
the first), the untrained generator's validation at 0: the same numbers ``metrics.csv``, the
checkpoint names (``step=k`` is ``trainer.global_step``), the Phi curve and the end-of-run
summary use. Before, Lightning's loggers counted from 0 (a step's metrics one below its
checkpoint's name, and the first step's row shared step 0 with the untrained validation).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import torch
import yaml

from dpg_lightning.cli import main
from tests.helpers import tiny_fit_config


def _config(tmp: Path) -> Path:
    path = tiny_fit_config(tmp, "run", 4)
    cfg = yaml.safe_load(path.read_text())
    run = tmp / "run"
    cfg["trainer"]["val_check_interval"] = 2
    cfg["trainer"]["callbacks"] += [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(run / "best"), "monitor": "val/phi", "mode": "max",
                       "save_top_k": -1, "filename": "step{step}",
                       "auto_insert_metric_name": False}},
        {"class_path": "callbacks.PhiCurvePlot"},
    ]
    path.write_text(yaml.safe_dump(cfg))
    return path


def _steps(name: str) -> list[int]:
    return [int(re.fullmatch(r"step(\d+)\.ckpt", name).group(1))]


def test_csv_checkpoints_plot_and_summary_count_dpg_steps(tmp_path, capsys):
    main(["fit", "--config", str(_config(tmp_path))])
    out = capsys.readouterr().out
    run = tmp_path / "run"
    with next(run.rglob("metrics.csv")).open() as f:
        rows = list(csv.DictReader(f))
    val = sorted({int(r["step"]) for r in rows if r.get("val/phi")})
    train = sorted({int(r["step"]) for r in rows if r.get("train/reward_mean")})
    assert val == [0, 2, 4] and train == [1, 2, 3, 4]
    every = sorted(s for p in (run / "ckpt").glob("*.ckpt") for s in _steps(p.name))
    by_val = sorted(s for p in (run / "best").glob("*.ckpt") for s in _steps(p.name))
    assert every == [1, 2, 3, 4] and by_val == [2, 4]
    # the last validation's checkpoint holds the callbacks' state after it
    state = torch.load(run / "best" / "step4.ckpt", map_location="cpu", weights_only=False)
    plot = next(v for k, v in state["callbacks"].items() if k.startswith("PhiCurvePlot"))
    summary = next(v for k, v in state["callbacks"].items() if k.startswith("RunSummary"))
    assert [step for step, _ in plot["history"]] == [0, 2, 4]
    assert sorted(summary["history"]) == [0, 2, 4]
    csv_phi = {int(r["step"]): float(r["val/phi"]) for r in rows if r.get("val/phi")}
    assert dict(plot["history"]) == csv_phi
    assert "  step 0: " in out and re.search(r"end \(step 4\)", out)
    assert state["global_step"] == 4
