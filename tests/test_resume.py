"""Exact resume: stop after step k, resume from the checkpoint, and land where an uninterrupted
run lands at step k + j (generator weights and logged metrics), on the tiny config.

What makes this hold: the prompt stream's position is saved with the datamodule, every step
re-seeds the sampling RNG from (seed, step, rank), and Lightning restores weights, optimizer
state, buffers and the step counter. Bad input (missing checkpoint, checkpoint of a different
model) fails with a clear message.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
import yaml

from dpg_lightning.cli import main
from tests.helpers import tiny_fit_config as _config

ROOT = Path(__file__).resolve().parents[1]
K, J = 2, 2


def _fit(config: Path, *extra: str) -> None:
    main(["fit", "--config", str(config), *extra])


def _metrics(run: Path) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for path in (run / "csv" / "version_0").glob("metrics.csv"):
        with path.open() as f:
            for row in csv.DictReader(f):
                step = int(row["step"])
                for key, value in row.items():
                    if value and key.startswith("train/") and not key.startswith("train/time"):
                        rows.setdefault(step, {})[key] = float(value)
    return rows


def _generator(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("generator.")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    _fit(_config(tmp, "straight", K + J))
    _fit(_config(tmp, "stopped", K))
    stopped = tmp / "stopped"
    _fit(_config(tmp, "stopped", K + J), "--ckpt_path", str(stopped / "ckpt" / f"step{K}.ckpt"))
    return tmp


def test_resume_is_exact(runs):
    straight, resumed = runs / "straight", runs / "stopped"
    a = _generator(straight / "ckpt" / f"step{K + J}.ckpt")
    b = _generator(resumed / "ckpt" / f"step{K + J}.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    # the run moved: a resume that ignored the checkpoint would not match step 0 weights either
    first = _generator(straight / "ckpt" / "step1.ckpt")
    assert any(not torch.equal(first[k], a[k]) for k in a)
    ma, mb = _metrics(straight), _metrics(resumed)
    late = [s for s in ma if s >= K]
    assert late, ma
    for step in late:
        assert mb[step] == ma[step], step
    dm_state = torch.load(resumed / "ckpt" / f"step{K + J}.ckpt", weights_only=False)
    assert dm_state["PromptDataModule"]["batches_consumed"] == K + J


def test_policy_micro_batches_make_the_same_update(runs):
    """``model.policy.micro_batch_size`` wired through the module: one rollout row per
    forward/backward gives the straight run's generator after a step, up to float32
    summation order (the exact, float64 check is tests/test_policy.py). Adam's first update
    is about ``lr * sign(grad)``, so a coordinate whose gradient nearly cancels may move by a
    little more than rounding: the bound is a thousandth of one update's size."""
    _fit(_config(runs, "micro", 1), "--model.policy.micro_batch_size=1")
    a = _generator(runs / "straight" / "ckpt" / "step1.ckpt")
    b = _generator(runs / "micro" / "ckpt" / "step1.ckpt")
    a2 = _generator(runs / "straight" / "ckpt" / "step2.ckpt")
    update = max(float((a2[k] - a[k]).abs().max()) for k in a)
    diff = max(float((b[k] - a[k]).abs().max()) for k in a)
    assert update > 1e-4, update
    assert diff <= 1e-3 * update, (diff, update)


def _config_error(capsys, config: Path, *extra: str) -> str:
    """Run ``fit``, which must stop with a config error (status 2); returns the message."""
    with pytest.raises(SystemExit) as exit_info:
        _fit(config, *extra)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    config = _config(tmp_path, "missing", 1)
    missing = str(tmp_path / "nope.ckpt")
    assert "nope.ckpt" in _config_error(capsys, config, "--ckpt_path", missing)


def test_checkpoint_of_another_model_is_a_clear_error(runs, tmp_path, capsys):
    bigger = {"generator": {**yaml.safe_load((ROOT / "configs/tiny/l2_norm.yaml").read_text())[
        "model"]["generator"], "hidden_size": 48, "intermediate_size": 64, "num_layers": 1}}
    config = _config(tmp_path, "other", K + 1, **bigger)
    expected = r"(?s)different model configuration.*generator.hidden_size: checkpoint 32, config 48"
    ckpt = str(runs / "stopped" / "ckpt" / f"step{K}.ckpt")
    err = _config_error(capsys, config, "--ckpt_path", ckpt)
    assert re.search(expected, err), err


def test_checkpoint_with_other_data_seed_is_a_clear_error(runs, tmp_path, capsys):
    config = _config(tmp_path, "seed", K + 1)
    ckpt = str(runs / "stopped" / "ckpt" / f"step{K}.ckpt")
    err = _config_error(capsys, config, "--data.seed=5", "--ckpt_path", ckpt)
    assert "different data.seed" in err
