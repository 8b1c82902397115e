"""The sbatch scripts: syntax, shellcheck, and runs under a real local Slurm cluster.

The cluster (``tests/slurm_cluster.py``) is started once for this module; without root or the
Slurm packages these tests skip with the reason. Each job trains the tiny CPU example with two
tasks; a job's batch log is ``<tmp>/<job name>-<job id>.out`` and its task logs are in
``<tmp>/logs``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megadiff.checkpoint_files import list_checkpoints, verify
from tests.slurm_cluster import SlurmCluster, start_cluster, why_no_slurm

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch")) + sorted((ROOT / "slurm").glob("*.sh"))
# two tasks of one CPU each: the whole 2-core test machine
CPU_SHAPE = ["--nodes=1", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]
STEPS = 600
TRAIN = [
    str(ROOT / "examples" / "tiny_cpu.yaml"),
    f"train.steps={STEPS}",
    "logging.every=10",
    "checkpoint.every=100",
    "checkpoint.keep=2",
]


def test_scripts_parse():
    assert len(SCRIPTS) >= 5
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck():
    r = subprocess.run(
        ["shellcheck", "-x", *(str(s.relative_to(ROOT)) for s in SCRIPTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = why_no_slurm()
    if reason:
        pytest.skip(reason)
    c = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield c
    c.stop()


def submit(
    c: SlurmCluster, folder: Path, script: str, options: list[str], args: list[str], **env: str
) -> str:
    """``sbatch`` from ``folder`` (no logs/ there) as a user would; the job id."""
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["sbatch", "--parsable", *options, str(ROOT / "slurm" / script), *args],
        cwd=folder,
        env=c.env(
            MEGADIFF_ROOT=str(ROOT),
            PYTHONPATH=str(ROOT),
            PYTHONWARNINGS="ignore",
            LOG_DIR=str(folder / "logs"),
            **env,
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip().split(";")[0]


def wait_for(what: str, ok, timeout: float, explain=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{explain()}")
        time.sleep(1)


def batch_log(folder: Path, job: str) -> str:
    logs = list(folder.glob(f"*-{job}.out"))
    return logs[0].read_text() if logs else "(no batch log)"


def wait_state(c: SlurmCluster, folder: Path, job: str, states: set[str], timeout: float) -> dict:
    info: dict = {}

    def reached() -> bool:
        info.update(c.job(job))
        return info.get("JobState") in states

    wait_for(
        f"job {job} to be {states}", reached, timeout, lambda: f"{info}\n" + batch_log(folder, job)
    )
    return info


def slurm_state(c: SlurmCluster, job: str) -> str:
    """The job's and the node's state, for a failure message."""
    info = c.job(job)
    keys = ("JobState", "Reason", "Restarts", "BatchFlag", "StartTime", "EligibleTime", "NodeList")
    nodes = c.run("sinfo", "-N", "-h", "-o", "%N %T %E", check=False)
    ctld = c.folder / "log" / "slurmctld.log"
    tail = "\n".join(ctld.read_text().splitlines()[-30:]) if ctld.exists() else ""
    head = " ".join(f"{k}={info.get(k)}" for k in keys)
    return f"job {job}: {head}\nnodes: {nodes}\nslurmctld.log:\n{tail}"


def wait_resumed(c: SlurmCluster, job: str, log: Path, pattern: str, start: int) -> None:
    """Wait for the released job to resume: the slurmctld starts it after the credential hold
    (~11 s) within its scheduling interval (5 s), once the node has finished the previous run
    (busy boxes: minutes)."""
    wait_log(log, pattern, 300, start, state=lambda: slurm_state(c, job))


def wait_log(
    path: Path, pattern: str, timeout: float, start: int = 0, state=lambda: ""
) -> re.Match:
    """Wait until ``pattern`` appears in ``path`` after character ``start`` (``state()``: more
    to print if it does not)."""
    found: list = []

    def seen() -> bool:
        text = path.read_text()[start:] if path.exists() else ""
        found[:] = [re.search(pattern, text)]
        return found[0] is not None

    wait_for(
        f"{pattern!r} in {path}",
        seen,
        timeout,
        lambda: state() + "\n" + (path.read_text()[-3000:] if path.exists() else ""),
    )
    return found[0]


def release(c: SlurmCluster, job: str, **update: str) -> None:
    """Let a requeued job start: Slurm holds it until its previous launch credential has
    expired (``cred_expire``, 10 s in the test cluster; starting it earlier with
    ``StartTime=now`` makes slurmd refuse the launch and the job end). ``update``: fields to
    change first (e.g. ``TimeLimit``)."""
    if update:
        c.run("scontrol", "update", f"JobId={job}", *(f"{k}={v}" for k, v in update.items()))


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def newest_checkpoint(run_dir: Path) -> tuple[int, Path]:
    step, path = list_checkpoints(run_dir / "checkpoints")[-1]
    assert verify(path) is None, verify(path)
    return step, path


def test_submit_refuses_a_shape_the_cluster_cannot_run(cluster, tmp_path):
    r = subprocess.run(
        [
            str(ROOT / "slurm" / "submit.sh"),
            "--gpus-per-node=0",
            "--cpus-per-task=64",
            str(ROOT / "slurm" / "train_single_node.sbatch"),
            *TRAIN,
        ],
        cwd=tmp_path,
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "cannot run the job as requested" in r.stderr and "--cpus-per-task" in r.stderr
    assert cluster.run("squeue", "-h") == ""  # nothing was submitted


def test_bad_environment_and_short_time_limit_fail_fast(cluster, tmp_path):
    bad_python = submit(
        cluster,
        tmp_path,
        "train_single_node.sbatch",
        CPU_SHAPE,
        TRAIN,
        MEGADIFF_PYTHON="/nonexistent/python",
    )
    short = submit(cluster, tmp_path, "train_single_node.sbatch", [*CPU_SHAPE, "--time=2"], TRAIN)
    for job, message in ((bad_python, "MEGADIFF_PYTHON"), (short, "--time of at least 5 minutes")):
        info = wait_state(cluster, tmp_path, job, {"FAILED"}, 60)
        assert info["ExitCode"] == "2:0" and info["Restarts"] == "0", info
        assert message in batch_log(tmp_path, job)


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory) -> list[tuple[int, float]]:
    """The reference: train.sbatch on one node, run to the end."""
    folder = tmp_path_factory.mktemp("reference")
    job = submit(cluster, folder, "train.sbatch", CPU_SHAPE, [*TRAIN, f"run.dir={folder / 'run'}"])
    info = wait_state(cluster, folder, job, {"COMPLETED", "FAILED", "CANCELLED"}, 300)
    out = batch_log(folder, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert "OMP_NUM_THREADS=1" in out and "training finished" in out
    assert newest_checkpoint(folder / "run")[0] == STEPS
    return step_losses(folder / "run")


def test_train_sbatch_runs_to_completion(uninterrupted):
    assert [s for s, _ in uninterrupted] == list(range(1, STEPS + 1))


def logged_after(step: int) -> int:
    """A step a few progress lines (``logging.every=10``) after ``step``."""
    return (step // 10 + 2) * 10


def stop_step(log: Path, start: int, signal_name: str) -> int:
    """The step at which megadiff stopped for ``signal_name`` (after character ``start``)."""
    m = wait_log(log, rf"stopping (at|before) step (\d+): received {signal_name}", 120, start)
    step = int(m.group(2))
    return step if m.group(1) == "at" else step - 1


def test_time_limit_and_requeue_resume_bit_exact(cluster, tmp_path, uninterrupted):
    """Time limit -> SIGUSR1 -> save -> exit 75 -> the script requeues; ``scontrol requeue``
    -> SIGTERM -> save -> Slurm requeues; the job then finishes with every step logged once and
    the losses of the uninterrupted run."""
    run_dir, log = tmp_path / "run", tmp_path / "logs" / "rank-0.log"
    job = submit(
        cluster,
        tmp_path,
        "train_single_node.sbatch",
        [*CPU_SHAPE, "--time=10", "--signal=USR1@100"],
        [*TRAIN, f"run.dir={run_dir}"],
        MEGADIFF_SIGNAL_LEAD="100",
    )
    wait_log(log, rf"step 110/{STEPS}", 180)  # after the first periodic save (step 100)
    # two minutes left, less than the 100 s warning: Slurm sends SIGUSR1 within 30 s
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=2")
    info = wait_state(cluster, tmp_path, job, {"PENDING"}, 120)
    assert info["Restarts"] == "1", info
    first = stop_step(log, 0, "SIGUSR1")
    assert 110 <= first < STEPS and newest_checkpoint(run_dir)[0] == first
    assert "requeueing job" in batch_log(tmp_path, job)

    mark = len(log.read_text())
    release(cluster, job, TimeLimit="10")
    wait_resumed(cluster, job, log, rf"resumed from \S+step_{first:08d} at step {first}", mark)
    wait_log(log, rf"step {logged_after(first)}/{STEPS}", 120, mark)
    cluster.run("scontrol", "requeue", job)
    info = wait_state(cluster, tmp_path, job, {"PENDING"}, 120)
    assert info["Restarts"] == "2", info
    second = stop_step(log, mark, "SIGTERM")
    assert second > first and newest_checkpoint(run_dir)[0] == second
    assert "not requeueing" in batch_log(tmp_path, job)  # Slurm requeued it already

    release(cluster, job)
    info = wait_state(cluster, tmp_path, job, {"COMPLETED", "FAILED"}, 300)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", batch_log(tmp_path, job)
    assert step_losses(run_dir) == uninterrupted


def test_torchrun_script_usr1_full_then_scancel(cluster, tmp_path):
    """``scancel --signal=USR1 --full`` reaches torchrun's workers (the agent ignores it) and
    the batch shell; rank 0's exit code 75 makes the script requeue although torchrun exits 1.
    After the resume, ``scancel`` (SIGTERM) leaves a complete checkpoint at the stop step."""
    run_dir = tmp_path / "run"
    log = tmp_path / "logs" / f"node-{cluster.host}.log"
    job = submit(
        cluster,
        tmp_path,
        "train_torchrun.sbatch",
        ["--nodes=1", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=2", "--time=10"],
        [*TRAIN, f"run.dir={run_dir}"],
        GPUS_PER_NODE="2",
    )
    wait_log(log, rf"step 110/{STEPS}", 180)
    cluster.run("scancel", "--signal=USR1", "--full", job)
    info = wait_state(cluster, tmp_path, job, {"PENDING"}, 120)
    assert info["Restarts"] == "1", info
    first = stop_step(log, 0, "SIGUSR1")
    assert newest_checkpoint(run_dir)[0] == first
    out = batch_log(tmp_path, job)
    assert "batch shell got SIGUSR1" in out and "requeueing job" in out, out

    mark = len(log.read_text())
    release(cluster, job)
    wait_resumed(cluster, job, log, rf"resumed from \S+ at step {first}", mark)
    wait_log(log, rf"step {logged_after(first)}/{STEPS}", 120, mark)
    cluster.run("scancel", job)
    info = wait_state(cluster, tmp_path, job, {"CANCELLED"}, 120)
    second = stop_step(log, mark, "SIGTERM")
    exit_file = tmp_path / "logs" / "exit-code"
    wait_for(
        "rank 0's exit code", lambda: exit_file.exists() and exit_file.read_text() == "75\n", 90
    )
    assert newest_checkpoint(run_dir)[0] == second > first
    steps = [s for s, _ in step_losses(run_dir)]
    assert steps == list(range(1, second + 1))


SWEEP_STEPS = 300  # the long point of the sweep test
ONE_TASK = [*CPU_SHAPE[:2], "--ntasks-per-node=1", "--cpus-per-task=1"]


def test_sweep_job_array_requeue_and_resume(cluster, tmp_path):
    """``megadiff sweep --slurm``: one array task per point; ``scontrol requeue`` of one task
    -> it saves, is requeued and resumes from its checkpoint; both finish; a second
    ``--slurm`` submits nothing."""
    import yaml

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "base": str(ROOT / "examples" / "tiny_cpu.yaml"),
                "dir": str(tmp_path / "sweep"),
                "set": {"logging.every": 10, "checkpoint.every": 100, "eval.every": 1000},
                "grid": {"train.steps": [100, SWEEP_STEPS]},
                "slurm": {"options": [*ONE_TASK, "--time=10"]},
            }
        )
    )
    command = [sys.executable, "-m", "megadiff", "sweep", str(spec), "--slurm"]
    env = cluster.env(PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    r = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    job = re.search(r"submitted job array (\d+)", r.stdout).group(1)
    long_dir = tmp_path / "sweep" / f"steps-{SWEEP_STEPS}"
    log = long_dir / "logs" / "rank-0.log"
    wait_log(log, rf"step 110/{SWEEP_STEPS}", 240)
    cluster.run("scontrol", "requeue", f"{job}_1")
    first = stop_step(log, 0, "SIGTERM")
    mark = len(log.read_text())
    info = wait_state(cluster, tmp_path, f"{job}_1", {"PENDING"}, 120)
    assert info["Restarts"] == "1", info
    release(cluster, f"{job}_1")
    wait_resumed(cluster, f"{job}_1", log, rf"resumed from \S+ at step {first}", mark)
    for task in ("0", "1"):
        info = wait_state(cluster, tmp_path, f"{job}_{task}", {"COMPLETED", "FAILED"}, 300)
        assert info["JobState"] == "COMPLETED", info
    assert (long_dir / "logs" / "exit-code").read_text() == "0\n"
    records = map(json.loads, (long_dir / "metrics.jsonl").read_text().splitlines())
    assert [r["step"] for r in records if "loss" in r] == list(range(1, SWEEP_STEPS + 1))
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout
