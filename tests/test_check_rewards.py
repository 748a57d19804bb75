"""``check-rewards`` and the ``RewardCheck`` callback: a step's rewards against exact leave-one-out.

The command's numbers are checked where they can be wrong: the arrays and statistics in the
JSON are the ones the statistics path computes from them, rewards shuffled among examples lose
the agreement, the set is the one training step 0 samples, and bad input is one ConfigError.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from dpg_lightning.analysis.agreement import agreement
from dpg_lightning.check_rewards import checked_indices, main
from dpg_lightning.cli import exit_on_run_error
from dpg_lightning.cli import main as cli_main
from dpg_lightning.common.errors import ConfigError
from tests.helpers import TINY_CONFIG, tiny_fit_args

#: The tiny config shrunk: 4 prompts x 2 samples = 8 examples, 4 inner steps of 2, small lr
#: (where the first-order reward should track the leave-one-out effect).
SMALL = tiny_fit_args()[1:] + [
    "--data.num_prompts=4", "--model.inner.optim.lr=0.03",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, object, Path]:
    out = tmp_path_factory.mktemp("check") / "check.json"
    result = main(["--config", TINY_CONFIG, *SMALL, "--num_examples", "8",
                   "--output", str(out), "--device", "cpu"])
    return json.loads(out.read_text()), result, out


def test_json_holds_arrays_statistics_and_floor(report):
    data, result, out = report
    assert len(data["rewards"]) == len(data["leave_one_out"]) == 8
    assert out.with_suffix(".png").stat().st_size > 0
    stats = agreement(torch.tensor(data["rewards"]), torch.tensor(data["leave_one_out"]))
    for key in ("pearson", "spearman", "slope_origin", "relative_error", "sign_agreement"):
        assert data["statistics"][key] == pytest.approx(getattr(stats, key))
    settings = data["settings"]
    assert settings["floor"] == pytest.approx(max(settings["reorder_noise"], settings["ulp"]))
    assert settings["loo_dtype"] == "float64" and settings["step"] == 0
    assert settings["set_size"] == 8 and len(settings["texts"]) == 8
    # at lr 0.03 the leave-one-out effects stand far above rounding, and r_i tracks them
    assert min(abs(v) for v in data["leave_one_out"]) > 100 * settings["floor"]
    assert data["statistics"]["spearman"] > 0.8, data["statistics"]


def test_rewards_permuted_among_examples_lose_the_agreement(report):
    """The statistics path can fail: the same rewards given to the wrong examples."""
    _, result, _ = report
    r, loo = result.rewards, result.leave_one_out.differences
    # the reward ranked k-th goes to the example whose leave-one-out is ranked (n-1-k)-th
    anti = torch.empty_like(r)
    anti[torch.argsort(loo, descending=True)] = torch.sort(r).values
    assert agreement(anti, loo).spearman == pytest.approx(-1.0)
    shuffled = r[torch.randperm(len(r), generator=torch.Generator().manual_seed(0))]
    assert agreement(shuffled, loo).spearman < result.stats.spearman - 0.3
    assert agreement(anti, loo).sign_agreement <= result.stats.sign_agreement


def test_the_checked_set_is_training_step_zeros(report, tmp_path):
    """Same prompts, sampling seed and inner order as step 0: the same rewards a fit logs."""
    _, result, _ = report
    root = tmp_path / "run"
    cli_main(["fit", "--config", TINY_CONFIG, *tiny_fit_args(root=root),
              "--data.num_prompts=4", "--model.inner.optim.lr=0.03",
              "--trainer.max_steps=1", "--trainer.val_check_interval=1000"])
    rows = list(csv.DictReader(next(root.rglob("metrics.csv")).open()))
    logged = [float(r["train/reward_mean"]) for r in rows if r.get("train/reward_mean")]
    assert logged[0] == pytest.approx(float(result.all_rewards.mean()), rel=1e-4)


def test_subset_is_spread_over_the_set():
    assert checked_indices(32, 32).tolist() == list(range(32))
    assert checked_indices(9, 3).tolist() == [0, 4, 8]
    assert len(set(checked_indices(33, 32).tolist())) == 32


@pytest.mark.parametrize("extra, message", [
    (["--num_examples", "9"], "between 2 and the step's set size 8"),
    (["--num_examples", "4", "--variant", "half"], "--variant half"),
])
def test_bad_input_is_one_config_error(tmp_path, extra, message):
    args = ["--config", TINY_CONFIG, *SMALL, "--output", str(tmp_path / "x.json"), *extra]
    with pytest.raises(ConfigError, match=message):
        main(args)


def test_command_prints_one_line(tmp_path, capsys):
    """Run as the CLI runs a command (``exit_on_run_error``): one line, status 2."""
    args = ["--config", TINY_CONFIG, *SMALL, "--num_examples", "99",
            "--output", str(tmp_path / "x.json")]
    with pytest.raises(SystemExit) as exit_:
        exit_on_run_error(lambda: main(args))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: `--num_examples 99`"), err


def test_callback_logs_its_metrics(tmp_path):
    root = tmp_path / "run"
    cli = cli_main([
        "fit", "--config", TINY_CONFIG, *tiny_fit_args(root=root),
        "--trainer.max_steps=2", "--trainer.val_check_interval=1",
        "--trainer.callbacks+=callbacks.reward_check.RewardCheck",
        "--trainer.callbacks.every_n_validations=2", "--trainer.callbacks.num_examples=3",
    ])
    rows = list(csv.DictReader(next(root.rglob("metrics.csv")).open()))
    keys = ["val/reward_loo_pearson", "val/reward_loo_spearman",
            "val/reward_loo_sign_agreement", "val/reward_loo_rel_error"]
    checked = [r for r in rows if r.get(keys[0])]
    # validations after steps 1 and 2: only the second is checked
    assert [int(r["step"]) for r in rows if r.get("val/phi")].count(1) == 1
    assert len(checked) == 1 and all(checked[0][k] for k in keys), rows
    cb = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RewardCheck")
    assert cb.validations == 2 and cb.last is not None
    assert float(checked[0][keys[0]]) == pytest.approx(cb.last.stats.pearson, rel=1e-5)
    written = json.loads((next(root.rglob("reward_check")) / "step2.json").read_text())
    assert len(written["rewards"]) == 3


def test_a_checkpoint_trained_with_other_settings_says_whose_values_are_used(tmp_path, capsys):
    """check-rewards builds the module from the config and takes only the generator's weights
    from a checkpoint, while validate rebuilds it from the checkpoint: each notice says which
    (check-rewards used to claim the checkpoint's values while checking the config's)."""
    root = tmp_path / "run"
    cli_main(["fit", "--config", TINY_CONFIG, *tiny_fit_args(root=root),
              "--model.inner.optim.name=adam", "--trainer.max_steps=1",
              "--trainer.val_check_interval=1000"])
    ckpt = str(next(root.rglob("last.ckpt")))
    capsys.readouterr()
    changed = r"(.|\n)*  model\.inner\.optim\.name: checkpoint 'adam', config 'sgd'\n(.|\n)*"
    with pytest.warns(UserWarning, match=r"^loading with changed model settings:"
                                         + changed + "the config's values are used"):
        main(["--config", TINY_CONFIG, *SMALL, "--ckpt_path", ckpt, "--num_examples", "2",
              "--output", str(tmp_path / "c.json"), "--device", "cpu"])
    assert "backend higher, sgd lr 0.03," in capsys.readouterr().out
    with pytest.warns(UserWarning, match=r"^validating with changed model settings:"
                                         + changed + "the checkpoint's values are used"):
        cli_main(["validate", "--config", TINY_CONFIG, *tiny_fit_args(root=root),
                  "--ckpt_path", ckpt])
