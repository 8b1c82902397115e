"""The sbatch scripts: syntax, shellcheck, and a run under stand-in srun/scontrol/scancel."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from megadiff.parallel.launch import free_port
from tests.workers import TINY

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch")) + [ROOT / "slurm" / "common.sh"]

# srun stand-in: SLURM_NTASKS local tasks of the command (options before it are skipped),
# each with its SLURM_PROCID/SLURM_LOCALID; exits with the highest task exit code, like srun.
FAKE_SRUN = r"""#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "$LOG_DIR/rank-$i.log" 2>&1 &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || { s=$?; (( s > rc )) && rc=$s; }; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then echo localhost; else echo "$@" >> "$FAKE_LOG"; fi
"""


def test_scripts_parse():
    assert len(SCRIPTS) >= 3
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


def _sbatch(tmp_path: Path, args: list[str]) -> tuple[int, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("scancel", "")):
        (bin_dir / name).write_text(body or "#!/bin/bash\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "MASTER_"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        PYTHONPATH=str(ROOT),
        PYTHONWARNINGS="ignore",
        MEGADIFF_ROOT=str(ROOT),
        LOG_DIR=str(tmp_path / "logs"),
        FAKE_LOG=str(tmp_path / "scontrol.log"),
        MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS="1",
        SLURM_JOB_ID="777",
        SLURM_JOB_NAME="test",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NTASKS="2",
    )
    r = subprocess.run(
        ["bash", str(ROOT / "slurm" / "train_single_node.sbatch"), *TINY, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return r.returncode, r.stdout + r.stderr


def test_single_node_script_trains_and_requeues_on_75(tmp_path):
    run_dir = tmp_path / "run"
    rc, out = _sbatch(tmp_path, [f"run.dir={run_dir}", "train.steps=2"])
    logs = tmp_path / "logs"
    assert rc == 0, out + (logs / "rank-0.log").read_text()[-2000:]
    assert "world 2 = TP 1 x PP 1 x DP 2" in (logs / "rank-0.log").read_text()
    assert (run_dir / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    assert not (tmp_path / "scontrol.log").exists()  # finished: no requeue

    # the time budget runs out: checkpoint, exit 75, the script requeues the job
    rc, out = _sbatch(
        tmp_path, [f"run.dir={run_dir}", "train.steps=50", "train.exit_after_minutes=1e-5"]
    )
    assert rc == 75, out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "777"]
    assert (run_dir / "checkpoints" / "step_00000003" / "manifest.json").is_file()
    assert "resumed from" in (logs / "rank-0.log").read_text()
