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

ROOT = Path(__file__).resolve().parents[1]
K, J = 2, 2


def _config(tmp: Path, name: str, max_steps: int, **model_overrides) -> Path:
    """The tiny config, shrunk to seconds, checkpointing every step under ``tmp/name``."""
    cfg = yaml.safe_load((ROOT / "configs/tiny/l2_norm.yaml").read_text())
    run = tmp / name
    cfg["trainer"].update(
        max_steps=max_steps,
        val_check_interval=1000,
        log_every_n_steps=1,
        default_root_dir=str(run),
        enable_progress_bar=False,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run), "name": "csv", "version": 0}},
        callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run / "ckpt"), "every_n_train_steps": 1,
                                  "save_top_k": -1, "filename": "step{step}",
                                  "auto_insert_metric_name": False}}],
    )
    model = cfg["model"]
    for m in ("generator", "target"):
        model[m].update(hidden_size=32, intermediate_size=64, num_layers=1)
    model["sampling"].update(samples_per_prompt=2, max_new_tokens=8)
    model["inner"].update(batch_size=2, max_length=16)
    model.update(model_overrides)
    cfg["data"].update(prompt_file=str(ROOT / "configs/tiny/prompts.txt"), num_prompts=2,
                       val_num_prompts=2)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


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
