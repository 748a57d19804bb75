"""The sbatch template on a real (one-node) Slurm cluster: 2 tasks, CPU/gloo, tiny config.

``slurm/testing/start_cluster.sh`` starts munge, slurmctld and slurmd with all their config,
state and logs in a temporary directory (installing Debian's Slurm first if it is missing);
the ``cluster`` fixture stops them again by pid and removes the packages if it installed them.
Where that cannot work (not root, no apt, no network) the tests skip and say why. Checked:
both ranks ran under ``srun``, the checkpoint exists, the logged metrics come from the shared
SFT (one SFT over both ranks' examples: ``train/sft_examples`` counts all of them and both
ranks ended with the same ``Phi``), and a job requeued mid-run (``scontrol requeue``) resumes
from its checkpoint instead of step 0.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_fit_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "slurm" / "single_node.sbatch"
NUM_PROMPTS, SAMPLES = 2, 2  # per rank (tests.helpers.tiny_fit_config)


SCRIPT = ROOT / "slurm" / "testing" / "start_cluster.sh"


def _as_root(*cmd: str) -> list[str]:
    return list(cmd) if os.geteuid() == 0 else ["sudo", "-n", *cmd]


def _proc(pid: int) -> str | None:
    """The command line of a running ``pid``; None when it is gone (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return None
    return cmdline.replace(b"\0", b" ").decode(errors="replace").strip()


def _cluster_procs(cluster_dir: Path) -> dict[int, str]:
    """The cluster's running processes, pid -> command line: the pids in its pid files and
    every process carrying its mark (start_cluster.sh starts the daemons with it in their
    environment; the slurmstepds that slurmd forks inherit it)."""
    pids = set()
    for f in (cluster_dir / "run").glob("*.pid"):
        try:
            pids.add(int(f.read_text()))
        except (OSError, ValueError):
            pass
    mark = f"DPG_TEST_CLUSTER={cluster_dir}".encode()
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and mark in (p / "environ").read_bytes().split(b"\0"):
                pids.add(int(p.name))
        except OSError:
            pass
    procs = {pid: _proc(pid) for pid in pids}
    return {pid: cmd for pid, cmd in procs.items() if cmd is not None}


def _stop_cluster(cluster_dir: Path) -> None:
    """Stop every process of the cluster (STOP=1, then SIGKILL by pid what is left), then
    purge the packages its start installed, if it installed any. Raises if anything stays."""
    procs = _cluster_procs(cluster_dir)
    stop = subprocess.run(_as_root("env", "STOP=1", str(SCRIPT), str(cluster_dir)),
                          capture_output=True, text=True, timeout=180)
    report = [f"STOP exit {stop.returncode}: {stop.stderr.strip()}"]
    procs.update(_cluster_procs(cluster_dir))
    left = {pid: cmd for pid, cmd in procs.items() if _proc(pid) == cmd}
    if left:
        report.append(f"SIGKILL {left}")
        subprocess.run(_as_root("kill", "-9", *map(str, left)))
        deadline = time.time() + 10
        while time.time() < deadline and any(_proc(pid) == cmd for pid, cmd in left.items()):
            time.sleep(0.2)
    still = {pid: cmd for pid, cmd in left.items() if _proc(pid) == cmd}
    installed = cluster_dir / "installed-packages"
    if not still and installed.is_file() and installed.stat().st_size:
        purge = subprocess.run(
            _as_root("env", "STOP=1", "UNINSTALL=1", str(SCRIPT), str(cluster_dir)),
            capture_output=True, text=True, timeout=600)
        report.append(f"UNINSTALL exit {purge.returncode}: {purge.stderr.strip()}")
        if purge.returncode != 0:
            still["packages"] = installed.read_text()
    (cluster_dir / "stop.log").write_text("\n".join(report) + "\n")
    if still:
        raise RuntimeError(f"the Slurm test cluster in {cluster_dir} left {still}:\n"
                           + "\n".join(report))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node Slurm cluster private to a temporary directory, for this module's tests:
    ``SLURM_CONF`` points the client commands (and the jobs' ``srun``) at it while they run;
    afterwards its daemons are stopped by pid and packages its start installed are purged."""
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        pytest.skip("Slurm test cluster needs root (apt-get and the daemons); not root here")
    cluster_dir = tmp_path_factory.mktemp("slurm-cluster")
    try:
        res = subprocess.run(_as_root(str(SCRIPT), str(cluster_dir)),
                             capture_output=True, text=True, timeout=600)
        why = None if res.returncode == 0 else (
            f"start_cluster.sh exit {res.returncode}: {(res.stderr or res.stdout).strip()[-500:]}")
    except subprocess.TimeoutExpired:
        why = "it did not come up within 10 minutes"
    if why:
        _stop_cluster(cluster_dir)  # a failed start may have started daemons or installed
        pytest.skip(f"Slurm test cluster unavailable ({why})")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", str(cluster_dir / "slurm.conf"))
            yield cluster_dir
    finally:
        _stop_cluster(cluster_dir)


def _slurm_config(tmp: Path, max_steps: int) -> Path:
    """The tiny config; checkpoints every step (and last.ckpt), under the job's run dir."""
    path = tiny_fit_config(tmp, "cfg", max_steps)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["callbacks"][0]["init_args"] = {
        "every_n_train_steps": 1, "save_last": True, "save_top_k": -1,
        "filename": "step{step}", "auto_insert_metric_name": False,
    }
    # The template points the logger (and so ModelCheckpoint's default dirpath) at RUN_DIR.
    cfg["trainer"]["logger"]["init_args"] = {"save_dir": "overridden", "name": "csv"}
    del cfg["trainer"]["default_root_dir"]
    path.write_text(yaml.safe_dump(cfg))
    return path


def _submit(tmp: Path, config: Path, *extra: str) -> tuple[str, Path, Path]:
    run_dir = tmp / "run"
    out = subprocess.run(
        ["sbatch", "--parsable", "--job-name=dpgtest", "--ntasks-per-node=2",
         "--cpus-per-task=1", "--gpus-per-node=0", "--mem=3G", "--time=15",
         f"--output={tmp}/%x-%j.out", f"--export=ALL,RUN_DIR={run_dir},DPG_ROOT={ROOT}",
         str(TEMPLATE), str(config), "--trainer.accelerator=cpu", *extra],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    job = out.stdout.strip().split(";")[0]
    return job, run_dir, tmp / f"dpgtest-{job}.out"


def _state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    m = re.search(r"JobState=(\S+)", out.stdout)
    return m.group(1) if m else "UNKNOWN"


def _wait(job: str, log: Path, until, timeout: float, what: str) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if until():
            return
        state = _state(job)
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(2)
    text = log.read_text()[-4000:] if log.exists() else "(no job log)"
    subprocess.run(["scancel", job])
    pytest.fail(f"job {job} ({_state(job)}) never reached: {what}\n--- job log ---\n{text}")


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with path.open() as f:
            rows += [dict(r, version=path.parent.name) for r in csv.DictReader(f)]
    return rows


def _ckpt_step(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def test_two_task_job_runs_the_shared_sft(cluster, tmp_path):
    steps = 2
    job, run_dir, log = _submit(tmp_path, _slurm_config(tmp_path, steps))
    _wait(job, log, lambda: _state(job) == "COMPLETED", 420, "COMPLETED")
    text = log.read_text()
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in text and "GLOBAL_RANK: 1, MEMBER: 2/2" in text, text
    assert "no checkpoint of this run yet" in text
    last = next(run_dir.glob("csv/version_0/checkpoints/last.ckpt"))
    assert _ckpt_step(last) == steps
    assert (run_dir / "wandb_run_id").read_text().strip()
    train = [r for r in _metrics(run_dir) if r.get("train/sft_examples")]
    assert len(train) == steps
    for row in train:
        # one SFT over both ranks' examples, and both ranks ended with the same target
        assert float(row["train/sft_examples"]) == 2 * NUM_PROMPTS * SAMPLES
        assert float(row["train/phi_rank_spread"]) == 0.0


def _release(job: str, log: Path) -> None:
    """Start a requeued job now: Slurm holds one ~2 minutes (EligibleTime) before restarting
    it; on a real cluster it simply starts a little later."""
    _wait(job, log, lambda: _state(job) == "PENDING", 90, "PENDING after requeue")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


def _attempt(text: str, n: int) -> str:
    """The job log of attempt ``n`` (0 = first start, 1 = first requeue, ...)."""
    parts = re.split(r"(?=\[dpg-slurm\] job \S+ restart )", text)
    return next(p for p in parts if re.match(rf"\[dpg-slurm\] job \S+ restart {n} ", p))


def _resumed_step(attempt: str) -> int:
    """The step the attempt resumed at (the checkpoint file itself is overwritten later)."""
    resumed = re.search(r"resuming \S+\.ckpt at step (\d+)", attempt)
    assert resumed, attempt[:2000]
    assert "Restoring states from the checkpoint path" in attempt, attempt[-3000:]
    return int(resumed.group(1))


def test_requeued_job_resumes_from_its_checkpoint(cluster, tmp_path):
    """Requeued twice: by ``scontrol requeue`` (a hard kill: resumes from last.ckpt), then by
    SIGUSR1 as Slurm sends it before the time limit (checkpoint between steps on all ranks,
    hpc_ckpt_1.ckpt, auto-requeue). Each attempt continues where the last one stopped."""
    # Long enough that neither attempt finishes before the test interrupts it (a tiny step
    # takes well under a second on an idle machine).
    steps = 200
    job, run_dir, log = _submit(tmp_path, _slurm_config(tmp_path, steps))

    def checkpoints() -> list[Path]:
        return list(run_dir.glob("csv/version_*/checkpoints/step*.ckpt"))

    # 1. hard requeue once the first attempt has checkpointed step 2
    _wait(job, log, lambda: len(checkpoints()) >= 2 and _state(job) == "RUNNING", 420,
          "a checkpoint at step 2 while running")
    subprocess.run(["scontrol", "requeue", job], check=True)
    _release(job, log)
    done = len(checkpoints())

    # 2. SIGUSR1 (as `#SBATCH --signal=SIGUSR1@90` sends it) once the second attempt has
    #    written two checkpoints of its own
    _wait(job, log, lambda: len(checkpoints()) >= done + 2 and _state(job) == "RUNNING", 420,
          "two checkpoints of the requeued attempt")
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    _wait(job, log, lambda: "SIGUSR1: saved" in log.read_text(), 120, "the SIGUSR1 checkpoint")
    _release(job, log)
    _wait(job, log, lambda: _state(job) == "COMPLETED", 420, "COMPLETED after two requeues")

    text = log.read_text()
    first = _resumed_step(_attempt(text, 1))
    second = _resumed_step(_attempt(text, 2))
    assert 2 <= first < second < steps, (first, second)
    assert (run_dir / "hpc_ckpt_1.ckpt").exists()
    assert "job " + job + " requeued" in _attempt(text, 1)
    # Each attempt continued at its checkpoint's step: steps before the first resume were
    # logged once (a restart from step 0 would log them again), and every step was logged,
    # except possibly the one just before the hard requeue's checkpoint: Lightning writes a
    # step's checkpoint (ModelCheckpoint.on_train_batch_end) before it logs that step's
    # metrics, so a SIGKILL between the two loses that one row (seen once in CI).
    # One run, one directory: every attempt logged into version_0, and the rows an attempt
    # wrote after its last checkpoint were dropped when the next one redid those steps.
    assert [p.name for p in run_dir.glob("csv/version_*")] == ["version_0"]
    logged = [int(r["step"]) for r in _metrics(run_dir) if r.get("train/sft_examples")]
    done = range(1, steps + 1)  # rows are at the DPG steps done, as checkpoints count them
    missing = set(done) - set(logged)
    assert missing <= {first} and set(logged) <= set(done), (missing, logged)
    assert all(logged.count(s) == 1 for s in done if s not in missing), logged
    lasts = run_dir.glob("csv/version_*/checkpoints/last.ckpt")
    final = max(lasts, key=lambda p: p.stat().st_mtime)
    assert _ckpt_step(final) == steps
