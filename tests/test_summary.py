"""The end-of-run summary (``RunSummary``): what a finished run prints equals its metrics.csv."""

from __future__ import annotations

import contextlib
import csv
import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from dpg_lightning.cli import main
from dpg_lightning.run.summary import RunSummary
from tests.helpers import TINY_CONFIG, tiny_fit_args

CONFIG = TINY_CONFIG
FAST = tiny_fit_args("--trainer.max_steps=4", "--trainer.val_check_interval=2")

def _approx(points: list[tuple[int, float]]) -> list:
    """``(step, value)`` rows compared with exact steps and float-tolerant values."""
    return [(step, pytest.approx(value)) for step, value in points]


def _columns(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """Every ``val/...`` column of a metrics.csv as ``(step, value)`` rows."""
    out: dict[str, list[tuple[int, float]]] = {}
    with metrics_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.startswith("val/") and value != "":
                    out.setdefault(key, []).append((int(row["step"]), float(value)))
    return out


@pytest.fixture(scope="module")
def fit(tmp_path_factory):
    """One short real fit of the tiny l2_norm config with the summary registered on the command
    line; returns (cli, its stdout, its metrics.csv)."""
    root = tmp_path_factory.mktemp("summary_run")
    args = [
        "fit", "--config", CONFIG, *FAST,
        f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.callbacks+=dpg_lightning.run.summary.RunSummary",
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        cli = main(args)
    return cli, stdout.getvalue(), next(root.rglob("metrics.csv"))


def _number(pattern: str, text: str) -> tuple[int, float]:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return int(match.group(1)), float(match.group(2))


def test_printed_phi_equals_metrics_csv(fit):
    cli, out, metrics_csv = fit
    phi = _columns(metrics_csv)["val/phi"]
    assert phi[0][0] == 0 and len(phi) >= 3, phi  # the untrained generator's step 0 + 2 checks
    first, last = phi[0], phi[-1]
    best = max(phi, key=lambda point: point[1])
    for pattern, want in [
        (r"\n  step (\d+): (\S+)", first),
        (r"\n  end \(step (\d+)\): (\S+)", last),
        (r"\n  best \(step (\d+)\): (\S+)", best),
    ]:
        step, value = _number(pattern, out)
        assert step == want[0] and value == pytest.approx(want[1], rel=1e-5)
    summary = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RunSummary))
    assert summary.series("val/phi") == _approx(phi)


def test_printed_readouts_equal_metrics_csv(fit):
    _, out, metrics_csv = fit
    readouts = {k: v for k, v in _columns(metrics_csv).items() if k != "val/phi"}
    assert "val/lm_head_norm" in readouts, readouts
    for key, rows in readouts.items():
        pattern = rf"\n  {re.escape(key)}: (\S+) \(step (\d+)\) -> (\S+) \(step (\d+)\)"
        line = re.search(pattern, out)
        assert line, f"{key} not in:\n{out}"
        assert (int(line.group(2)), float(line.group(1))) == pytest.approx(rows[0], rel=1e-5)
        assert (int(line.group(4)), float(line.group(3))) == pytest.approx(rows[-1], rel=1e-5)


def test_artefacts_listed_and_exist(fit):
    cli, out, metrics_csv = fit
    assert f"metrics.csv: {metrics_csv}" in out
    best = cli.trainer.checkpoint_callback.best_model_path
    assert best and f"(best: {best})" in out and Path(best).is_file()
    assert re.search(r"run directory: \S+", out) and re.search(r"wall time: \d+\.\d s", out)
    listed = re.findall(r"^(?:PhiCurvePlot|SampleWriter): (\S+)$", out, flags=re.MULTILINE)
    assert len(set(listed)) == 2 and all(Path(p).exists() for p in listed), out


def test_checkpoint_carries_the_whole_history(fit):
    cli, _, metrics_csv = fit
    last = next(Path(cli.trainer.default_root_dir).rglob("last.ckpt"))
    states = torch.load(last, weights_only=False)["callbacks"]
    state = next(v for k, v in states.items() if k.startswith("RunSummary"))
    resumed = RunSummary()
    resumed.load_state_dict(state)
    # last.ckpt is written at step 4, before the validation of step 4 (logger step 3).
    assert 0 in resumed.history and resumed.wall_time() > 0
    phi = dict(_columns(metrics_csv)["val/phi"])
    assert {s: m["val/phi"] for s, m in resumed.history.items()} == pytest.approx(
        {s: phi[s] for s in resumed.history}
    )


class _FakeWandb(WandbLogger):
    """A WandbLogger that needs no wandb run: only its run summary is used."""

    def __init__(self) -> None:
        self.run_summary: dict[str, float] = {}
        self._save_dir = None

    @property
    def experiment(self) -> SimpleNamespace:
        return SimpleNamespace(summary=self.run_summary)


def test_wandb_run_summary_gets_the_numbers(capsys):
    summary = RunSummary()
    summary.record(0, {"val/phi": -2.0, "val/pixel_accuracy": 0.5, "train/loss": 1.0})
    summary.record(9, {"val/phi": -1.0, "val/pixel_accuracy": 0.75})
    summary.record(19, {"val/phi": -1.5, "val/pixel_accuracy": 0.875})
    wandb = _FakeWandb()
    trainer = SimpleNamespace(loggers=[wandb], callbacks=[], checkpoint_callback=None)
    summary.report(trainer, None)
    got = wandb.run_summary
    assert (got["summary/phi_first"], got["summary/phi_end"], got["summary/phi_best"]) == (
        -2.0, -1.5, -1.0
    )
    assert (got["summary/phi_best_step"], got["summary/phi_gain"]) == (9, 0.5)
    assert (got["summary/pixel_accuracy_first"], got["summary/pixel_accuracy_end"]) == (0.5, 0.875)
    assert "summary/loss_end" not in got and "summary/wall_time_s" in got
    assert "best (step 9): -1" in capsys.readouterr().out


@pytest.mark.parametrize(("values", "says"), [((-2.0, -1.0), False), ((-1.0, -2.0), True)])
def test_a_best_at_step_0_says_no_step_beat_the_untrained_generator(values, says):
    """Step 0 has no checkpoint, so the best checkpoint a run lists is another step's: the
    summary says when the best validation is the untrained generator's."""
    summary = RunSummary()
    for step, value in zip((0, 2), values, strict=True):
        summary.record(step, {"val/phi": value})
    trainer = SimpleNamespace(checkpoint_callback=None, callbacks=[], loggers=[])
    best = next(x for x in summary.lines(trainer, None) if x.strip().startswith("best"))
    assert ("no step beat it" in best) is says, best
