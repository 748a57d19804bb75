"""The tiny configs show a researcher what a run does: progress, a closing readout, a picture.

Why: ``configs/tiny/sixty_seven.yaml`` (the task that visibly works) ran with its progress
turned off, drew no picture and printed no readout, and ``make demo`` (then the l2 task) ended
inside its own seed-to-seed spread. The fits run as subprocesses with stdout to a pipe, as under
Slurm, so the progress they print is the one a cluster log gets.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, logged_steps, piped_fit, val_phi_by_step

TINY = sorted((ROOT / "configs/tiny").glob("*.yaml"))

#: ``make demo``'s DPG gain in val/phi over seeds 0 1 2 (benchmarks/README.md, section 9,
#: commit a7f787e: +0.3004, +0.3012, +0.3155; the start's seed spread is 0.0088 std). Floor:
#: half the smallest measured gain, still 17 times the start's spread.
DEMO_GAIN_FLOOR = 0.15


def _config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _lm_head_pattern(cfg: dict) -> bool:
    return cfg["model"]["metric"]["class_path"].endswith(".LMHeadPattern")


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_a_tiny_config_leaves_progress_on(path):
    """``enable_progress_bar: false`` silences the per-step lines of a log as well as the bar."""
    assert _config(path)["trainer"].get("enable_progress_bar", True) is not False


@pytest.mark.parametrize("path", [p for p in TINY if _lm_head_pattern(_config(p))],
                         ids=lambda p: p.stem)
def test_a_tiny_lm_head_config_draws_its_curve_and_patch(path):
    callbacks = [c["class_path"] for c in _config(path)["trainer"]["callbacks"]]
    assert "callbacks.PhiCurvePlot" in callbacks
    assert "callbacks.LMHeadPatchImage" in callbacks


@pytest.mark.slow
def test_sixty_seven_prints_progress_a_readout_and_draws_the_patch(tmp_path):
    """One step of the config as written: a step line, the summary with the pixel accuracy,
    the val/phi curve and the patch beside the "67" bitmap."""
    lines = piped_fit(tmp_path, "--config", "configs/tiny/sixty_seven.yaml",
                      "--trainer.max_steps=1")
    assert logged_steps(lines) == [(1, 1)]
    summary = lines[lines.index("=== run summary ==="):]
    assert any(x.strip().startswith("val/pixel_accuracy:") for x in summary), summary
    run = next(tmp_path.rglob("metrics.csv")).parent
    assert (run / "val_phi.png").is_file()
    assert (run / "lm_head_patch/step000001_vs_target.png").is_file()


@pytest.mark.slow
def test_make_demo_gains_far_outside_the_seed_spread(tmp_path):
    """``make demo``'s config, unchanged: val/phi at its last validation beats step 0 by more
    than the floor, and the printed summary shows both."""
    lines = piped_fit(tmp_path, "--config", "configs/tiny/demo.yaml")
    curve = val_phi_by_step(tmp_path)
    end = max(curve)
    assert (min(curve), end) == (0, 60)
    assert curve[end] - curve[0] > DEMO_GAIN_FLOOR, curve
    summary = "\n".join(lines[lines.index("=== run summary ==="):])
    assert f"step 0: {curve[0]:.6g}" in summary, summary
    assert f"end (step 60): {curve[end]:.6g}" in summary, summary
