"""Runs that never lose work and never report false success.

Interrupts (SIGTERM, Ctrl-C, kill -9) and resumes keep one run directory and lose no finished
step; checkpoints are written so that a kill or a full disk never leaves a broken file; broken
checkpoints are skipped by name; diverging runs stop with a non-zero status; the last step is
always validated; the command line offers what works and nothing else. Each test runs the real
thing: real signals to a real ``fit`` process, real kills during real writes.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from dpg_lightning.cli import main
from dpg_lightning.common.errors import TrainingDiverged
from dpg_lightning.metrics.base import Metric
from dpg_lightning.metrics.l2_norm import lm_head_weight
from dpg_lightning.run.checkpoint_files import AtomicCheckpointIO, checkpoint_step, unreadable
from dpg_lightning.run.csv_logger import RunCSVLogger
from dpg_lightning.run.divergence import DivergenceGuard, StepNumbers
from dpg_lightning.run.last_checkpoint import LastCheckpoint
from dpg_lightning.run.progress import PhaseReporter, PhaseTQDMProgressBar
from dpg_lightning.run.threads import choose_threads
from tests.helpers import TINY_CONFIG, tiny_fit_args

ROOT = Path(__file__).resolve().parents[1]
CONFIG = TINY_CONFIG
SMALL = ("--model.generator.hidden_size=32", "--model.target.hidden_size=32")
TINY = tiny_fit_args(*SMALL)


def _args(root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", CONFIG, *tiny_fit_args(*SMALL, root=root), *extra]


def _foreground_sigint() -> None:
    """SIGINT as a terminal's Ctrl-C finds it: a suite started as a background job (``make
    test &``, ``nohup``) hands its children SIGINT ignored, which the run rightly respects."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(root: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "DPG_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dpg_lightning", *_args(root, *extra)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_foreground_sigint)


def _samples_steps(root: Path) -> list[int]:
    files = list(root.rglob("samples.jsonl"))
    if not files:
        return []
    return [json.loads(line)["step"] for line in files[0].read_text().splitlines() if line]


def _train_steps(root: Path) -> list[int]:
    rows = []
    for path in root.rglob("metrics.csv"):
        with path.open() as f:
            rows += [int(r["step"]) for r in csv.DictReader(f) if r.get("train/reward_mean")]
    return rows


def _wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    pytest.fail("timed out")


def _stop(proc: subprocess.Popen) -> None:
    """Leave nothing running: kill the process by its pid if it is still alive."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


# ------------------------------------------------------------------ signals


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_checkpoints_and_resumes_losing_nothing(tmp_path, signum):
    proc = _start(tmp_path, "--trainer.max_steps=500", "--trainer.val_check_interval=1000")
    try:
        _wait_for(lambda: len(set(_samples_steps(tmp_path))) >= 3, 300, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=300)
    finally:
        _stop(proc)
    assert proc.returncode == 128 + signum, err[-3000:]
    done = max(_samples_steps(tmp_path))  # DPG steps finished (1 for the first)
    last = tmp_path / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint_step(last) == done, "the finished step must be in the checkpoint"
    assert "--ckpt_path last" in err
    # Resuming continues at that step, in the same directory, logging every step once.
    main(_args(tmp_path, f"--trainer.max_steps={done + 2}", "--trainer.val_check_interval=1000",
               "--ckpt_path", "last"))
    assert [p.name for p in (tmp_path / "csv").iterdir()] == ["version_0"]
    assert sorted(_train_steps(tmp_path)) == list(range(1, done + 3))  # DPG steps 1..
    steps = _samples_steps(tmp_path)  # the same DPG steps, each written once
    assert sorted(set(steps)) == list(range(1, done + 3))
    assert len(steps) == len(set(steps)) * steps.count(1)


@pytest.mark.slow
def test_kill_9_resumes_the_newest_checkpoint_in_the_same_directory(tmp_path):
    """The config's LastCheckpoint refreshes last.ckpt every 10 steps whether or not val/phi
    improved (here: no validation at all), so a hard kill loses fewer than 10 steps."""
    proc = _start(tmp_path, "--trainer.max_steps=500", "--trainer.val_check_interval=1000")
    ckpts = tmp_path / "csv" / "version_0" / "checkpoints"

    def saved_step() -> int:
        last = ckpts / "last.ckpt"
        return checkpoint_step(last) if last.is_file() else 0

    try:
        _wait_for(lambda: saved_step() >= 10, 300, proc)
        time.sleep(0.5)
    finally:
        _stop(proc)  # kill -9
    saved = checkpoint_step(ckpts / "last.ckpt")
    assert saved >= 10 and saved % 10 == 0
    cli = main(_args(tmp_path, f"--trainer.max_steps={saved + 2}",
                     "--trainer.val_check_interval=1000", "--ckpt_path", "last"))
    assert cli.trainer.global_step == saved + 2
    assert [p.name for p in (tmp_path / "csv").iterdir()] == ["version_0"]
    steps = _train_steps(tmp_path)
    # Every step once (DPG steps 1..); the only one that may be missing is the step whose
    # checkpoint was written just before the kill (Lightning checkpoints a step before it logs
    # it).
    assert len(steps) == len(set(steps)) and set(range(1, saved + 3)) - set(steps) <= {saved}


# ------------------------------------------------------------------ checkpoints


def test_last_checkpoint_holds_the_final_step_not_only_every_tenth(tmp_path):
    main(_args(tmp_path, "--trainer.max_steps=12", "--trainer.val_check_interval=1000"))
    last = tmp_path / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint_step(last) == 12
    with pytest.raises(ValueError, match="every_n_train_steps=0"):
        LastCheckpoint(every_n_train_steps=0)


def test_last_skips_a_broken_checkpoint_and_names_it(tmp_path, capsys):
    main(_args(tmp_path, "--trainer.max_steps=2", "--trainer.val_check_interval=1"))
    ckpts = tmp_path / "csv" / "version_0" / "checkpoints"
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a write cut short
    os.utime(last)  # and the newest file
    assert unreadable(last) == "it is truncated" or "not a complete" in unreadable(last)
    cli = main(_args(tmp_path, "--trainer.max_steps=3", "--trainer.val_check_interval=1",
                     "--ckpt_path", "last"))
    err = capsys.readouterr().err
    assert "skipped an unreadable checkpoint" in err and "last.ckpt" in err
    assert cli.trainer.global_step == 3  # resumed from step 2's top-k checkpoint
    with pytest.raises(SystemExit) as exit_info:  # an explicit broken path is named, too
        last.write_bytes(b"")
        main(_args(tmp_path, "--trainer.max_steps=4", "--ckpt_path", str(last)))
    assert exit_info.value.code == 2 and "last.ckpt" in capsys.readouterr().err


_WRITER = textwrap.dedent("""
    import sys, torch
    from dpg_lightning.run.checkpoint_files import AtomicCheckpointIO
    io, path, i = AtomicCheckpointIO(), sys.argv[1], 0
    print("ready", flush=True)
    while True:
        i += 1
        io.save_checkpoint({"i": i, "w": torch.full((4_000_000,), float(i))}, path)
""")


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_leaves_a_good_checkpoint(tmp_path):
    """A writer rewrites a 16 MB checkpoint in a loop; killed at random moments eight times,
    the file is always a complete checkpoint (the previous one or the new one)."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"i": 0, "w": torch.zeros(1)}, path)
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.3 + 0.37 * attempt)
        finally:
            _stop(proc)
        assert unreadable(path) is None, attempt
        state = torch.load(path, weights_only=True)
        assert state["w"].numel() == 1 or bool((state["w"] == state["i"]).all())


_FULL_DISK = textwrap.dedent("""
    import resource, signal, sys, torch
    from dpg_lightning.run.checkpoint_files import AtomicCheckpointIO
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk: writes fail with an error
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
    io, path = AtomicCheckpointIO(), sys.argv[1]
    io.save_checkpoint({"w": torch.ones(1000)}, path)
    try:
        io.save_checkpoint({"w": torch.ones(1_000_000)}, path)
    except OSError as err:
        print(err)
""")


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    out = subprocess.run([sys.executable, "-c", _FULL_DISK, str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert "the previous one is kept" in out.stdout, out.stdout + out.stderr
    assert torch.load(path, weights_only=True)["w"].numel() == 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left


# ------------------------------------------------------------------ one run, one directory


def test_csv_logger_continues_a_resumed_run(tmp_path):
    first = RunCSVLogger(tmp_path, name="csv", version=0)
    for step in range(6):
        first.log_metrics({"a": step}, step)
    first.save()
    # resumed from the checkpoint of DPG step 4: its row stays, step 5's is redone
    resumed = RunCSVLogger(tmp_path, name="csv", version=0, resume_step=4)
    resumed.log_metrics({"a": 50, "b": 1.0}, 5)
    resumed.save()
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["a"], r.get("b")) for r in rows] == [
        ("0", "0", ""), ("1", "1", ""), ("2", "2", ""), ("3", "3", ""), ("4", "4", ""),
        ("5", "50", "1.0")]


def test_a_fresh_run_never_overwrites_an_earlier_runs_results(tmp_path, capsys):
    fixed = [*_args(tmp_path, "--trainer.max_steps=1"), "--trainer.logger.init_args.version=0"]
    main(fixed)
    metrics = tmp_path / "csv" / "version_0" / "metrics.csv"
    before = metrics.read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(fixed)
    assert exit_info.value.code == 2 and "earlier run" in capsys.readouterr().err
    assert metrics.read_text() == before


# ------------------------------------------------------------------ broken runs


def test_a_diverging_inner_loop_stops_with_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(_args(tmp_path, "--trainer.max_steps=20", "--model.inner.optim.lr=1e12"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "model.inner.optim.lr" in err and "1e+12" in err
    assert not [p for p in tmp_path.rglob("*.ckpt") if "nan" in p.name]


class NanAfterTraining(Metric):
    """Finite on the initial target, NaN as soon as the LM head moves."""

    def setup(self, target: nn.Module) -> None:
        self.initial = lm_head_weight(target).detach().clone()

    def __call__(self, target: nn.Module) -> torch.Tensor:
        head = lm_head_weight(target)
        moved = (head - self.initial.to(head)).abs().max() > 0
        return torch.where(moved, torch.tensor(float("nan")), -head.norm())


def test_a_metric_that_turns_nan_after_sft_stops_the_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(_args(tmp_path, "--trainer.max_steps=20",
                   "--model.metric=tests.test_run_safety.NanAfterTraining"))
    assert exit_info.value.code == 1 and "Phi is nan" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing was ranked by a NaN


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, capsys, monkeypatch):
    import dpg_lightning.dpg.step as dpg_step
    from dpg_lightning.inner import Attribution

    def nan_rewards(target, data, phi, cfg, order, progress=None):
        nan = torch.full((len(data),), float("nan"))
        return Attribution(nan, torch.tensor(0.0), [torch.tensor(0.0)])

    monkeypatch.setattr(dpg_step, "metagradient_rewards", nan_rewards)
    with pytest.raises(SystemExit) as exit_info:
        main(_args(tmp_path, "--trainer.max_steps=10", "--model.max_nonfinite_steps=3"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "3 consecutive steps up to step 3" in err
    assert "4 of 4 rewards" in err
    assert sorted(_train_steps(tmp_path)) == []  # skipped steps log no rewards...
    with (next(tmp_path.rglob("metrics.csv"))).open() as f:
        skipped = [r["step"] for r in csv.DictReader(f) if r.get("train/skipped_nonfinite")]
    assert skipped == ["1", "2", "3"]  # ...but are logged as skipped (at DPG steps 1..3)


def test_a_single_nonfinite_step_is_tolerated():
    guard = DivergenceGuard(2, [("model.inner.optim.lr", 0.1)])
    good = StepNumbers(torch.ones(4), torch.ones(1), [torch.ones(3)]).problems()
    bad = StepNumbers(torch.tensor([1.0, float("inf"), 1, 1]), torch.ones(1), [torch.ones(3)])
    assert good == [] and bad.problems() == ["1 of 4 rewards"]
    for step, problems in enumerate([bad.problems(), good, bad.problems()]):
        guard.record(step, problems)
        guard.raise_if_diverged()
    guard.record(3, bad.problems())
    with pytest.raises(TrainingDiverged, match=r"2 consecutive steps up to step 3.*lr` \(now 0.1"):
        guard.raise_if_diverged()


def test_fast_dev_run_writes_no_files_and_names_none(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = ROOT / CONFIG
    main(["fit", "--config", str(config), *TINY, "--trainer.fast_dev_run=true",
          f"--data.prompt_file={ROOT / 'configs/tiny/prompts.txt'}"])
    assert not list(tmp_path.rglob("samples.jsonl")) and not list(tmp_path.rglob("*.png"))
    for line in capsys.readouterr().out.splitlines():
        if ": " in line and line.split(": ", 1)[0] in ("SampleWriter", "PhiCurvePlot"):
            pytest.fail(f"the summary names a file that was never written: {line}")


# ------------------------------------------------------------------ command line


def test_help_lists_what_works(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(f"  {c}" in out for c in ("fit", "validate", "sample", "export"))
    assert "  test" not in out and "  predict" not in out
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", CONFIG])
    assert exit_info.value.code == 2 and "unknown command 'test'" in capsys.readouterr().err


@pytest.mark.slow
def test_installed_script_runs_every_command():
    script = shutil.which("dpg-lightning", path=str(Path(sys.executable).parent))
    assert script, "the dpg-lightning script is not installed"
    for command in ("fit", "validate", "sample", "export"):
        out = subprocess.run([script, command, "--help"], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0 and "usage" in out.stdout.lower(), (command, out.stderr)


def test_export_refuses_an_existing_file(tmp_path, capsys):
    main(_args(tmp_path, "--trainer.max_steps=1"))
    ckpt = next(tmp_path.rglob("last.ckpt"))
    target = tmp_path / "existing.bin"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--config", CONFIG, *TINY[1:], "--ckpt_path", str(ckpt),
              "--output", str(target)])
    assert exit_info.value.code == 2 and "existing file" in capsys.readouterr().err
    assert target.read_text() == "keep me"
    with pytest.raises(SystemExit) as exit_info:  # a config of another model: one message
        main(["sample", "--config", CONFIG, *TINY[1:], "--model.generator.hidden_size=48",
              "--ckpt_path", str(ckpt), "--num_examples", "2", "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "different model configuration" in err
    assert "size mismatch" not in err and "Traceback" not in err


def test_make_clean_keeps_runs():
    clean = subprocess.run(["make", "-n", "clean"], cwd=ROOT, capture_output=True, text=True)
    assert clean.returncode == 0 and "runs" not in clean.stdout
    runs = subprocess.run(["make", "-n", "clean-runs"], cwd=ROOT, capture_output=True, text=True)
    assert runs.returncode == 0 and "runs" in runs.stdout


# ------------------------------------------------------------------ threads and progress


def test_threads_follow_the_cpus_this_process_can_use(monkeypatch):
    from dpg_lightning.run import threads

    for name in ("DPG_NUM_THREADS", "OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_cgroup_cpus", lambda: None)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(threads, "busy_cpus", lambda: 3.2)
    assert choose_threads().threads == 5  # 8 CPUs, about 3 busy with other work
    monkeypatch.setattr(threads, "busy_cpus", lambda: None)  # no /proc/stat: the load average
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.6, 1.0, 1.0))
    assert choose_threads().threads == 6
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    assert choose_threads().threads == 2  # a restricted mask: others' load is elsewhere
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert choose_threads().threads == 1
    monkeypatch.setenv("DPG_NUM_THREADS", "3")
    assert choose_threads() == threads.ThreadChoice(3, 3, 0, "DPG_NUM_THREADS")


def test_progress_shows_the_phases_of_a_step(tmp_path):
    """The module reports each phase of a step and of the step-0 validation; the bar shows
    the current one and no version number."""
    seen: list[str] = []
    original = PhaseReporter.phase

    def record(self, name, done=0, total=0):
        seen.append(name)
        original(self, name, done, total)

    PhaseReporter.phase = record
    try:
        main(_args(tmp_path, "--trainer.max_steps=1", "--trainer.val_check_interval=1000"))
    finally:
        PhaseReporter.phase = original
    for phase in ("validation: rollout", "validation: inner SFT", "rollout", "inner SFT",
                  "attribution", "policy update"):
        assert phase in seen, (phase, sorted(set(seen)))
    bar = PhaseTQDMProgressBar()
    bar.current_phase = "inner SFT 3/12"

    class Trainer:
        progress_bar_metrics = {"phi": 1.0}
        loggers = []

    items = bar.get_metrics(Trainer(), None)
    assert items == {"phi": 1.0, "phase": "inner SFT 3/12"}


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    cfg = yaml.safe_load((ROOT / "configs/tiny/l2_norm_wandb.yaml").read_text())
    for logger in cfg["trainer"]["logger"]:
        logger["init_args"]["save_dir"] = str(tmp_path)
    cfg["trainer"]["default_root_dir"] = str(tmp_path)
    config = tmp_path / "wandb.yaml"
    config.write_text(yaml.safe_dump(cfg))
    base = ["fit", "--config", str(config), *TINY, "--trainer.val_check_interval=1000"]

    def run_id(cli) -> str:
        wandb_logger = cli.trainer.loggers[1]
        run = wandb_logger.experiment
        identity = run.id
        run.finish()
        return identity

    first = run_id(main([*base, "--trainer.max_steps=1"]))
    assert (tmp_path / "csv" / "version_0" / "wandb_run_id").read_text().strip() == first
    resumed = run_id(main([*base, "--trainer.max_steps=2", "--ckpt_path", "last"]))
    assert resumed == first and [p.name for p in (tmp_path / "csv").iterdir()] == ["version_0"]
