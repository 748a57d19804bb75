"""One DPG step as a whole: its SFT jobs, their scoring, and how the run counts and times it.

Two regressions: a step skipped for non-finite numbers used to advance Lightning's step counter
once where an updated step advanced it once per PPO mini-batch, shifting ``max_steps`` and the
checkpoint steps of every run with several mini-batches; and with inverse groups
``time/inner_sft`` / ``time/attribution`` held the last group's time instead of the step's.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
import torch

import dpg_lightning.dpg.step as dpg_step
from dpg_lightning.cli import main
from dpg_lightning.common.seeds import derive_seed
from dpg_lightning.data.tokenization import TokenRows
from dpg_lightning.inner import Attribution, InnerConfig, RankOrder, SFTSet, inner_order
from dpg_lightning.inner.shared_sft import WorldInfo
from dpg_lightning.run.last_checkpoint import LastCheckpoint
from tests.helpers import TINY_CONFIG, tiny_fit_args

CONFIG = TINY_CONFIG
TINY = tiny_fit_args("--model.generator.hidden_size=32", "--model.target.hidden_size=32")


def _fit(root: Path, *extra: str):
    return main(["fit", "--config", CONFIG, *TINY, f"--trainer.default_root_dir={root}",
                 f"--trainer.logger.init_args.save_dir={root}", *extra])


def _rows(root: Path) -> list[dict[str, str]]:
    with next(root.rglob("metrics.csv")).open() as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ jobs and scoring


def test_jobs_of_a_step():
    inner = InnerConfig(batch_size=4)
    (whole,) = dpg_step.sft_jobs(SFTSet(3, 2), inner, 0, 5, "shared", WorldInfo())
    assert whole.rows is None and whole.order.num_examples == 6
    assert [len(b) for b in whole.order.batches] == [4, 2]
    groups = dpg_step.sft_jobs(SFTSet(3, 2, inverse_groups=True), inner, 0, 5, "shared",
                               WorldInfo())
    assert [job.rows.tolist() for job in groups] == [[0, 2, 4], [1, 3, 5]]
    # seeded as always (resumes replay a step's orders): by the step, and by the group; a
    # group's batch is capped at its size
    expected = inner_order(6, 4, True, derive_seed(0, "inner_order", 5))
    assert [b.tolist() for b in whole.order.batches] == [b.tolist() for b in expected]
    for k, job in enumerate(groups):
        expected = inner_order(3, 3, True, derive_seed(0, "inner_order", 5, k))
        assert [b.tolist() for b in job.order.batches] == [b.tolist() for b in expected]


def test_scoring_puts_rewards_in_rows_and_sums_the_times():
    """Each group's rewards land in its rows, Phi is the groups' mean, and the seconds of the
    step are the sum over its SFTs (they used to be the last group's)."""
    data = TokenRows(torch.arange(6)[:, None], torch.ones(6, 1), torch.arange(6)[:, None])

    def fake(target, rows, phi, inner, order: RankOrder, progress=None) -> Attribution:
        ids = rows.input_ids[:, 0].double()
        return Attribution(ids * 10, ids.mean(), [ids.sum()],
                           {"inner_sft": 1.0, "attribution": 0.25})

    jobs = dpg_step.sft_jobs(SFTSet(3, 2, inverse_groups=True), InnerConfig(batch_size=3), 0,
                             0, "shared", WorldInfo())
    score = dpg_step.score_step(fake, None, data, None, InnerConfig(), jobs)
    assert score.rewards.tolist() == [0, 10, 20, 30, 40, 50]
    assert float(score.phi) == 2.5 and len(score.losses) == 2 and score.num_examples == 3
    assert score.seconds == {"inner_sft": 2.0, "attribution": 0.5}
    (whole,) = dpg_step.sft_jobs(SFTSet(3, 2), InnerConfig(batch_size=3), 0, 0, "shared",
                                 WorldInfo())
    single = dpg_step.score_step(fake, None, data, None, InnerConfig(), [whole])
    assert single.rewards.tolist() == [0, 10, 20, 30, 40, 50] and float(single.phi) == 2.5
    assert single.seconds == {"inner_sft": 1.0, "attribution": 0.25}


@pytest.mark.slow
def test_inverse_groups_log_the_whole_steps_times(tmp_path, monkeypatch):
    """The logged ``time/inner_sft`` and ``time/attribution`` of a step with two inverse
    groups are both groups' (each real SFT reports a fixed time here)."""
    original = dpg_step.metagradient_rewards

    def fixed_times(*args, **kwargs) -> Attribution:
        out = original(*args, **kwargs)
        out.seconds = {"inner_sft": 1.5, "attribution": 10.0}
        return out

    monkeypatch.setattr(dpg_step, "metagradient_rewards", fixed_times)
    _fit(tmp_path, "--trainer.max_steps=1", "--trainer.val_check_interval=1",
         "--model.sft_groups=inverse")
    (step,) = [r for r in _rows(tmp_path) if r.get("time/inner_sft")]
    assert float(step["time/inner_sft"]) == 3.0 and float(step["time/attribution"]) == 20.0


# ------------------------------------------------------------------ step counting


#: what the runs below wrap, taken before any test patches them
_METAGRADIENT_REWARDS = dpg_step.metagradient_rewards
_LAST_CHECKPOINT_HOOKS = (LastCheckpoint.on_train_batch_end, LastCheckpoint._save_last)


def _counted_run(root: Path, monkeypatch, nan_at: int | None) -> dict[str, object]:
    """A 4-step run with 2 PPO mini-batches per step; the ``nan_at``-th SFT (if any) returns
    NaN rewards. Returns the DPG steps run, the global step after each, the steps at which
    last.ckpt was written and the step last.ckpt holds."""
    calls: list[int] = []
    after_batches: list[int] = []
    saves: list[int] = []
    original = _METAGRADIENT_REWARDS

    def maybe_nan(target, data, *args, **kwargs) -> Attribution:
        calls.append(len(calls))
        out = original(target, data, *args, **kwargs)
        if len(calls) - 1 == nan_at:
            out.rewards = torch.full_like(out.rewards, float("nan"))
        return out

    batch_end, save_last = _LAST_CHECKPOINT_HOOKS

    def record_batch_end(self, trainer, *args):
        after_batches.append(trainer.global_step)
        return batch_end(self, trainer, *args)

    def record_save(self, trainer):
        saves.append(trainer.global_step)
        return save_last(self, trainer)

    monkeypatch.setattr(dpg_step, "metagradient_rewards", maybe_nan)
    monkeypatch.setattr(LastCheckpoint, "on_train_batch_end", record_batch_end)
    monkeypatch.setattr(LastCheckpoint, "_save_last", record_save)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = _fit(root, "--trainer.max_steps=4", "--trainer.val_check_interval=4",
                   "--model.policy.num_minibatches=2")
    ckpt = torch.load(next(root.rglob("last.ckpt")), map_location="cpu", weights_only=False)
    # (not metrics.csv's train/skipped_nonfinite: Lightning repeats a logged value at later
    # steps that do not log it)
    skipped = [str(w.message).split(":")[0] for w in caught
               if "policy update skipped" in str(w.message)]
    # the project's warning names the project's line, not Lightning's strategy.py
    where = {Path(w.filename).name for w in caught if "policy update skipped" in str(w.message)}
    assert where <= {"module.py"}, where
    return {"dpg_steps": len(calls), "global_steps": after_batches, "saves": saves,
            "last_ckpt_step": ckpt["global_step"], "final": cli.trainer.global_step,
            "skipped": skipped}


@pytest.mark.slow
def test_a_skipped_step_does_not_shift_the_run(tmp_path, monkeypatch):
    """A skipped step counts as one step like an updated one, so ``max_steps`` counts DPG
    steps and checkpoints stay on schedule (before: 2 updated steps reached max_steps 4, and a
    skipped one shifted every later step by one)."""
    clean = _counted_run(tmp_path / "clean", monkeypatch, nan_at=None)
    with_nan = _counted_run(tmp_path / "nan", monkeypatch, nan_at=1)
    assert clean["skipped"] == [] and with_nan["skipped"] == ["step 2"]  # the 2nd DPG step
    for run in (clean, with_nan):
        assert run["dpg_steps"] == 4 and run["global_steps"] == [1, 2, 3, 4]
        assert run["final"] == 4 and run["last_ckpt_step"] == 4 and run["saves"] == [4]
