"""Progress in a log: a run whose stdout is not a terminal prints a line per DPG step.

Why: a Slurm ``.out`` (or ``tee``, a file) got a single progress line, at the very end, from
the terminal bar; a cluster job looked dead for hours. The fits run as subprocesses with stdout
to a pipe (as under Slurm), so the bar-or-lines choice is the real one.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dpg_lightning.run.progress import step_line
from tests.helpers import logged_steps, piped_fit

STEPS = 4
TINY = [
    "--config", "configs/tiny/l2_norm.yaml",
    "--model.sampling.max_new_tokens=8",
    "--model.sampling.samples_per_prompt=2",
    "--data.num_prompts=2",
    "--data.val_num_prompts=2",
    "--model.inner.batch_size=2",
    "--model.generator.hidden_size=32",
    "--model.target.hidden_size=32",
    f"--trainer.max_steps={STEPS}",
    "--trainer.val_check_interval=2",
]


def _fit(root: Path, *extra: str) -> list[str]:
    """The stdout lines of a tiny fit whose stdout is a pipe."""
    return piped_fit(root, *TINY, *extra, timeout=300)


@pytest.mark.slow
def test_a_log_gets_the_first_and_last_step_and_every_validation(tmp_path):
    """The default: fast steps are throttled (one line every few seconds), yet the first and
    the last step are there, with the step count, Phi and an ETA, and each validation."""
    lines = _fit(tmp_path)
    steps = logged_steps(lines)
    assert steps[0] == (1, STEPS) and steps[-1] == (STEPS, STEPS), "\n".join(lines)
    last = next(line for line in lines if line.startswith(f"[dpg] step {STEPS}/{STEPS}"))
    assert " phi " in last and "reward mean" in last and "val/phi" in last
    assert [line.split(" |")[0] for line in lines if "validation at" in line] == [
        "[dpg] validation at step 2", "[dpg] validation at step 4"]


@pytest.mark.slow
def test_every_step_and_phase_when_asked(tmp_path):
    """``every_s: 0`` prints every step; ``phase_every_s: 0`` the phases within a step."""
    lines = _fit(tmp_path, "--trainer.callbacks+=dpg_lightning.run.progress.TQDMPhaseLines",
                 "--trainer.callbacks.every_s=0", "--trainer.callbacks.phase_every_s=0")
    assert logged_steps(lines) == [(k, STEPS) for k in range(1, STEPS + 1)], "\n".join(lines)
    assert any(re.match(r"\[dpg\] step 1/4 \| inner SFT .*so far$", line) for line in lines)
    assert any(line.startswith("[dpg] validation at step 2 | validation: ") for line in lines)


def test_step_line_reads_the_logged_metrics():
    metrics = {"time/rollout": 0.4, "time/inner_sft": 1.12, "time/attribution": 0.3,
               "time/policy_update": 0.2, "train/reward_mean": 1.2e-5,
               "train/reward_std": 3e-6, "train/phi_after_sft": -25.81}
    assert step_line(3, 20, metrics, (-25.82, 0), 34.4) == (
        "[dpg] step 3/20 | rollout 0.40s sft 1.1s attr 0.30s update 0.20s | reward mean 1.2e-05"
        " std 3e-06 | phi -25.81 | val/phi -25.82 (step 0) | eta 0:00:34")
    assert step_line(1, -1, {}, None, None) == "[dpg] step 1/?"
    # other time/ metrics: seconds, or a rate (RolloutMetrics' examples per second)
    assert step_line(2, 4, {"time/rollout": 0.4, "time/examples_per_second": 115.34,
                            "time/reload": 2.5}, None, None) == (
        "[dpg] step 2/4 | rollout 0.40s examples/s 115 reload 2.5s")
