"""studies.compare reads a run's validations at the DPG steps they followed.

Before: once runs logged ``step`` themselves (b2b5cac) their CSV has no ``epoch`` column, and
every validation was read as step 0, so a comparison's "untrained" and "final" were the same
merged point.
"""

from __future__ import annotations

import csv
from pathlib import Path

from dpg_lightning.cli import main
from studies.compare import read_curve
from tests.helpers import TINY_CONFIG, tiny_fit_args


def test_read_curve_places_a_real_runs_validations_at_its_dpg_steps(tmp_path):
    main(["fit", "--config", TINY_CONFIG, *tiny_fit_args(root=tmp_path),
          "--trainer.max_steps=2", "--trainer.val_check_interval=1"])
    metrics = next(tmp_path.rglob("metrics.csv"))
    with metrics.open(newline="") as f:
        logged = [(int(r["step"]), float(r["val/phi"])) for r in csv.DictReader(f) if r["val/phi"]]
    curve = read_curve(metrics)
    assert [step for step, _ in curve] == [0, 1, 2]
    assert [(step, point["phi"]) for step, point in curve] == logged


def test_read_curve_reads_a_csv_of_the_older_step_origin(tmp_path):
    """Older runs logged a validation inside training at one step less, with an epoch."""
    path = Path(tmp_path) / "metrics.csv"
    path.write_text("epoch,step,val/phi\n,0,-3.0\n0,0,\n0,19,-2.5\n0,39,-2.0\n")
    assert read_curve(path) == [[0, {"phi": -3.0}], [20, {"phi": -2.5}], [40, {"phi": -2.0}]]
