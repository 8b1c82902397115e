"""A real single-node Slurm cluster for the tests: munge + slurmctld + slurmd on this machine.

Needs root and Debian's ``slurmctld slurmd slurm-client munge`` (``tools/install.sh --slurm``).
The cluster's ``slurm.conf`` lives in a temporary folder and is found through ``SLURM_CONF``,
so nothing under /etc/slurm is touched; the daemons are stopped by PID at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = "slurmctld slurmd slurm-client munge"
MUNGE_KEY = Path("/etc/munge/munge.key")


def why_no_slurm() -> str | None:
    """Why a local cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root"
    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(c) is None]
    if missing:
        return (
            f"Slurm is not installed ({', '.join(missing)} missing): "
            f"`bash tools/install.sh --slurm` (apt-get install {PACKAGES})"
        )
    return None


def _slurm_conf(folder: Path, host: str) -> str:
    cpus = os.cpu_count() or 1
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 512
    return f"""ClusterName=megadiff-test
SlurmctldHost={host}
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
# a requeued job waits cred_expire + 1 s (default 120) before it may start again: a launch
# before its old credential expires is refused ("Job credential revoked") and ends the job
AuthInfo=cred_expire=10
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
KillWait=30
MinJobAge=3600
NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5, check=True).stdout
        subprocess.run(["unmunge"], input=cred, capture_output=True, timeout=5, check=True)
        return True
    except (subprocess.SubprocessError, OSError):
        return False


def _start_munge(folder: Path) -> subprocess.Popen | None:
    """Start munged unless one already answers; None when it was running already."""
    if _munge_works():
        return None
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    if not MUNGE_KEY.exists():
        MUNGE_KEY.write_bytes(os.urandom(1024))
    shutil.chown(MUNGE_KEY, "munge", "munge")
    MUNGE_KEY.chmod(0o400)
    proc = subprocess.Popen(
        ["runuser", "-u", "munge", "--", "munged", "-F"],
        stdout=open(folder / "log" / "munged.out", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _wait_for(_munge_works, 10, "munged did not start", folder)
    return proc


def _wait_for(ok, timeout: float, what: str, folder: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}; see the logs in {folder / 'log'}")
        time.sleep(0.3)


@dataclass
class SlurmCluster:
    """A running local cluster; :meth:`env` is the environment its client commands need."""

    folder: Path
    host: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        # a user's shell: no SLURM_ variables, no OMP_NUM_THREADS (the job derives its own)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k != "OMP_NUM_THREADS"
        }
        env.update(SLURM_CONF=str(self.folder / "slurm.conf"), **extra)
        return env

    def run(self, *cmd: str, check: bool = True) -> str:
        r = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stdout}{r.stderr}")
        return r.stdout + r.stderr

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as key -> value (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def idle(self) -> bool:
        r = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], env=self.env(), capture_output=True, text=True
        )
        return r.returncode == 0 and "idle" in r.stdout

    def stop(self) -> None:
        subprocess.run(["scancel", "--user=root"], env=self.env(), capture_output=True)
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_cluster(folder: Path) -> SlurmCluster:
    """munged (unless running), slurmctld and slurmd in the foreground of their own sessions."""
    for sub in ("state", "spool", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    (folder / "slurm.conf").write_text(_slurm_conf(folder, host))
    cluster = SlurmCluster(folder, host)
    munge = _start_munge(folder)
    if munge is not None:
        cluster.procs.append(munge)
    for daemon in (["slurmctld", "-D", "-i"], ["slurmd", "-D"]):
        name = daemon[0]
        cluster.procs.append(
            subprocess.Popen(
                daemon,
                env=cluster.env(),
                stdout=open(folder / "log" / f"{name}.out", "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    try:
        _wait_for(cluster.idle, 60, "the local Slurm cluster did not come up", folder)
    except RuntimeError:
        cluster.stop()
        raise
    return cluster
