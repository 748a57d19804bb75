"""``validate``, ``sample`` and ``export`` read a training run and never write into it.

A validation used to append a step-0 row (the trained generator's value) to the run's
``metrics.csv``, replace its ``config.yaml`` and print "resuming"; now it writes into
``<run>/validate/step<N>`` and says so. The tests hash every file of a real tiny run before
and after the other commands.
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from pathlib import Path

import pytest
import torch
from jsonargparse import Namespace

from dpg_lightning.cli import main
from dpg_lightning.run.csv_logger import RunCSVLogger
from dpg_lightning.run.run_dir import RUN_CSV, resolve_run
from dpg_lightning.run.wandb_run import WANDB_ID_FILE
from tests.helpers import TINY_CONFIG, tiny_fit_args

SMALL = ("--model.generator.hidden_size=32", "--model.target.hidden_size=32")
STEPS = 2


def _hashes(root: Path, skip: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and skip not in p.parents}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_validate_sample_and_export_leave_the_training_run_byte_identical(tmp_path, capsys):
    args = [*tiny_fit_args(*SMALL, root=tmp_path)]
    main(["fit", "--config", TINY_CONFIG, *args, f"--trainer.max_steps={STEPS}",
          f"--trainer.val_check_interval={STEPS}"])
    run = tmp_path / "csv" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    before = _hashes(tmp_path, out)
    assert {"metrics.csv", "config.yaml", "samples.jsonl", "val_phi.png"} <= {
        p.name for p in before}
    capsys.readouterr()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(["validate", "--config", TINY_CONFIG, *args, "--ckpt_path", str(last),
                    "--trainer.enable_progress_bar=true"])
    printed = capsys.readouterr()
    err = printed.err
    # the step validate shows is the checkpoint's DPG step (Lightning restores no loop state
    # under validate: its global_step reads 0), and ModelCheckpoint's notice that its top-k
    # is not reloaded into validate's directory is not shown
    assert f"[dpg] validation at step {STEPS} | val/phi" in printed.out
    assert "validation at step 0" not in printed.out
    assert cli.trainer.callback_metrics["step"] == STEPS
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    first = run / "validate" / f"step{STEPS}"
    assert f"validating checkpoint {last} (step {STEPS}): metrics and config go to {first}" in err
    assert "resuming" not in err
    assert Path(cli.trainer.log_dir) == first
    main(["validate", "--config", TINY_CONFIG, *args, "--ckpt_path", "last"])
    assert f"go to {run / 'validate' / f'step{STEPS}_2'}" in capsys.readouterr().err
    ckpt_args = ["--config", TINY_CONFIG, *tiny_fit_args(*SMALL)[1:], "--ckpt_path", str(last)]
    main(["sample", *ckpt_args, "--num_examples=2", f"--output={out / 'data.jsonl'}"])
    main(["export", *ckpt_args, f"--output={out / 'generator'}"])

    after = _hashes(tmp_path, out)
    changed = [str(p) for p in before if after.get(p) != before[p]]
    assert not changed, changed
    new = {p.relative_to(run) for p in after if p not in before}
    assert all(p.parts[0] == "validate" for p in new), new
    assert [p.name for p in (tmp_path / "csv").iterdir()] == ["version_0"]
    # validate's val/phi is written where it said, at the checkpoint's step, and it is the
    # value the training run logged for that checkpoint
    trained = [r for r in _rows(run / "metrics.csv") if r.get("val/phi")][-1]
    for directory in (first, run / "validate" / f"step{STEPS}_2"):
        (row,) = _rows(directory / "metrics.csv")
        assert int(row["step"]) == STEPS
        assert float(row["val/phi"]) == pytest.approx(float(trained["val/phi"]), rel=1e-5)
        assert (directory / "config.yaml").is_file()
    assert (out / "data.jsonl").is_file() and (out / "generator" / "config.json").is_file()


def test_validate_last_without_a_checkpoint_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", TINY_CONFIG, *tiny_fit_args(*SMALL, root=tmp_path),
              "--ckpt_path", "last"])
    assert exit_info.value.code == 2
    assert "no readable checkpoint" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.*"))


def _config(tmp: Path, ckpt: Path, verbose: bool) -> Namespace:
    loggers = [
        Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                  init_args=Namespace(save_dir=str(tmp), name="csv", version=None)),
        Namespace(class_path="lightning.pytorch.loggers.WandbLogger",
                  init_args=Namespace(save_dir=str(tmp), id=None, project="p")),
    ]
    config = Namespace(ckpt_path=str(ckpt), trainer=Namespace(
        default_root_dir=str(tmp), logger=loggers, callbacks=[]))
    if verbose:
        config["verbose"] = True  # an argument of Trainer.validate only
    return config


def test_validate_starts_its_own_wandb_run_and_logs_at_the_checkpoint_step(tmp_path):
    run = tmp_path / "csv" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"global_step": 5, "state_dict": {}}, ckpt)
    (run / WANDB_ID_FILE).write_text("trainingrun\n")

    fit = _config(tmp_path, ckpt, verbose=False)
    resolve_run(fit)
    assert fit.trainer.logger[1].init_args.id == "trainingrun"  # a resume continues it

    validate = _config(tmp_path, ckpt, verbose=True)
    resolved = resolve_run(validate)
    csv_logger, wandb_logger = validate.trainer.logger
    assert csv_logger.class_path == RUN_CSV
    assert (csv_logger.init_args.save_dir, csv_logger.init_args.name,
            csv_logger.init_args.version) == (str(run), "validate", "step5")
    assert csv_logger.init_args.at_step == 5 and "resume_step" not in csv_logger.init_args
    assert wandb_logger.init_args.id is None
    assert wandb_logger.init_args.save_dir == str(run / "validate" / "step5")
    assert validate.trainer.default_root_dir == str(run / "validate" / "step5")
    assert not any("resuming" in note for note in resolved.notes)


def test_csv_logger_at_step_logs_every_row_at_that_step(tmp_path):
    logger = RunCSVLogger(tmp_path, name="validate", version="step7", at_step=7)
    logger.log_metrics({"val/phi": -1.5}, 0)
    logger.save()
    (row,) = _rows(tmp_path / "validate" / "step7" / "metrics.csv")
    assert (row["step"], row["val/phi"]) == ("7", "-1.5")
