"""``PhiCurvePlot`` draws metrics.csv's points: step 0 included, at the CSV's steps, and a
reference run beside them."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from callbacks.plots import PhiCurvePlot
from dpg_lightning.cli import main
from tests.helpers import TINY_CONFIG, tiny_fit_args

CONFIG = TINY_CONFIG  # its callbacks include PhiCurvePlot
FAST = tiny_fit_args("--trainer.max_steps=4", "--trainer.val_check_interval=2")

def _approx(points: list[tuple[int, float]]) -> list:
    """``(step, value)`` rows compared with exact steps and float-tolerant values."""
    return [(step, pytest.approx(value)) for step, value in points]


def _phi_rows(metrics_csv: Path) -> list[tuple[int, float]]:
    with metrics_csv.open(newline="") as f:
        return [(int(r["step"]), float(r["val/phi"])) for r in csv.DictReader(f) if r["val/phi"]]


@pytest.fixture(scope="module")
def fit(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot_run")
    cli = main([
        "fit", "--config", CONFIG, *FAST,
        f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
    ])
    plot = next(cb for cb in cli.trainer.callbacks if isinstance(cb, PhiCurvePlot))
    return plot, next(root.rglob("metrics.csv"))


def test_points_are_metrics_csv_rows_from_step_0(fit):
    plot, metrics_csv = fit
    rows = _phi_rows(metrics_csv)
    assert rows[0][0] == 0 and [s for s, _ in rows[1:]] == [2, 4], rows  # DPG steps
    assert plot.history == _approx(rows)
    assert plot.output_path is not None and plot.output_path.is_file()


def test_reference_run_is_drawn_as_a_second_line(fit, tmp_path):
    _, metrics_csv = fit
    plot = PhiCurvePlot(reference=str(metrics_csv), reference_label="dataset reward")
    plot.output_path = tmp_path / "val_phi.png"
    plot.record(0, {"val/phi": -1.0})
    plot.record(5, {"val/phi": -0.5})
    lines = {line.get_label(): line for line in plot.draw().axes[0].get_lines()}
    reference = _phi_rows(metrics_csv)
    assert plot.reference_points == _approx(reference)
    xs, ys = lines["dataset reward"].get_data()
    assert list(zip(xs, ys, strict=True)) == _approx(reference)
    assert list(zip(*lines["val/phi"].get_data(), strict=True)) == [(0, -1.0), (5, -0.5)]


def test_missing_reference_is_named(tmp_path):
    plot = PhiCurvePlot(reference=str(tmp_path / "nope.csv"))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        plot.setup(None, None, "fit")  # type: ignore[arg-type]
