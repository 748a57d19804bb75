"""Every benchmark and study runs as ``python -m <package>.<name>``: it imports with the one
absolute style (no ``sys.path`` edits) and its child processes start the same way."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["benchmarks.dpg_step", "benchmarks.knobs", "benchmarks.metagrad_cost",
           "benchmarks.micro_batch_memory", "benchmarks.plan_check", "benchmarks.rehearsal",
           "studies.compare", "studies.qr_oracle", "studies.reward_fidelity",
           "studies.uuid_reward_probe"]


def test_every_script_is_listed():
    found = {f"{d}.{p.stem}" for d in ("benchmarks", "studies")
             for p in (ROOT / d).glob("*.py")} - {"benchmarks.__init__", "studies.__init__"}
    libraries = {"benchmarks.harness", "benchmarks.phase_meter", "studies.figures"}
    assert found - libraries == set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_has_main(name):
    module = importlib.import_module(name)
    assert callable(module.main)
    source = Path(module.__file__).read_text()
    assert "sys.path.insert" not in source and "from harness" not in source


def test_child_command_runs_the_module_from_anywhere(tmp_path):
    """``module_command`` + ``module_env`` reach the repository's packages from another cwd."""
    env = harness.module_env(OMP_NUM_THREADS="1")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    cmd = [sys.executable, "-c", "import benchmarks, studies; print('ok')"]
    assert harness.module_command("benchmarks.knobs")[1:] == ["-m", "benchmarks.knobs"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
