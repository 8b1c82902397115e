"""Running a sweep's points: locally, N ``megadiff train`` subprocesses at a time, or as one
Slurm job array (one array task per point) over ``slurm/sweep.sbatch``.

Both are resumable. A point whose ``logs/exit-code`` says 0 is finished and skipped; any other
point is (re)started with ``megadiff train <point>/point.yaml``, which continues from the
point's newest checkpoint (``checkpoint.resume``), so a point killed mid-run loses at most the
steps since its last save. Failed points (an exit code other than 0 or 75) are listed with
their log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from megadiff.study.sweep import EXIT_FILE, LOG_DIR, POINT_CONFIG, Point, Spec, exit_code

REQUEUE = 75  # megadiff train: checkpoint saved, run me again
ROOT = Path(__file__).resolve().parents[2]


def pending_points(spec: Spec) -> list[Point]:
    """The points not finished yet; prints the finished ones as skipped."""
    todo = []
    for point in spec.points:
        if exit_code(point.directory(spec.dir)) == 0:
            print(f"  {point.name}: finished, skipped")
        else:
            todo.append(point)
    return todo


def train_command(point_dir: Path) -> list[str]:
    return [sys.executable, "-m", "megadiff", "train", str(point_dir / POINT_CONFIG)]


def start_point(point_dir: Path, threads: int) -> subprocess.Popen:
    """``megadiff train`` of one point, its output appended to ``logs/rank-0.log``."""
    logs = point_dir / LOG_DIR
    logs.mkdir(parents=True, exist_ok=True)
    (logs / EXIT_FILE).unlink(missing_ok=True)
    env = dict(os.environ, MEGADIFF_EXIT_FILE=str(logs / EXIT_FILE))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("PYTHONWARNINGS", "ignore")
    with open(logs / "rank-0.log", "a") as log:
        return subprocess.Popen(
            train_command(point_dir), stdout=log, stderr=subprocess.STDOUT, env=env
        )


def record_exit(point_dir: Path, code: int) -> None:
    """The exit code, unless megadiff wrote its own (it does on every exit it reaches)."""
    path = point_dir / LOG_DIR / EXIT_FILE
    if not path.exists():
        path.write_text(f"{code}\n")


def run_local(spec: Spec, parallel: int) -> int:
    """Run the pending points, ``parallel`` at a time; 0 when all finished, 75 when stopped
    by a signal (run the same command again to continue), 1 when some failed."""
    todo = pending_points(spec)
    threads = max(1, (os.cpu_count() or 1) // parallel)
    running: dict[str, tuple[subprocess.Popen, Path]] = {}
    failed: list[tuple[str, int, Path]] = []
    stopping: list[int] = []

    def stop(signum, _frame) -> None:  # pass the stop on: each run saves and exits 75
        stopping.append(signum)
        for proc, _ in running.values():
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while (todo and not stopping) or running:
            while todo and not stopping and len(running) < parallel:
                point = todo.pop(0)
                folder = point.directory(spec.dir)
                print(f"  {point.name}: started (log {folder / LOG_DIR / 'rank-0.log'})")
                running[point.name] = (start_point(folder, threads), folder)
            time.sleep(0.5)
            for name, (proc, folder) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[name]
                record_exit(folder, code)
                code = exit_code(folder)
                print(f"  {name}: exit code {code}", flush=True)
                if code not in (0, REQUEUE):
                    failed.append((name, code, folder / LOG_DIR / "rank-0.log"))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for name, code, log in failed:
        print(f"failed: {name} (exit code {code}); log: {log}")
    if failed:
        return 1
    if stopping or todo:
        print("stopped: run the same command again to continue the unfinished points")
        return REQUEUE
    return 0


def points_file(spec: Spec, points: list[Point]) -> Path:
    """``<dir>/slurm-points.txt``: line i (from 1) is array task i-1's point config."""
    path = spec.dir / "slurm-points.txt"
    path.write_text("".join(f"{p.directory(spec.dir).resolve() / POINT_CONFIG}\n" for p in points))
    return path


def submit_slurm(spec: Spec, extra_options: list[str]) -> int:
    """Submit the pending points as one job array (through ``slurm/submit.sh``, which refuses
    a shape the cluster can never run); prints the job id."""
    todo = pending_points(spec)
    if not todo:
        print("all points finished; nothing to submit")
        return 0
    listing = points_file(spec, todo)
    script = ROOT / "slurm" / spec.slurm_script
    command = [
        str(ROOT / "slurm" / "submit.sh"),
        "--parsable",
        f"--array=0-{len(todo) - 1}",
        f"--output={spec.dir.resolve()}/slurm-%A_%a.out",
        *spec.slurm_options,
        *extra_options,
        str(script),
        str(listing),
    ]
    env = dict(os.environ, MEGADIFF_ROOT=str(ROOT))
    env.setdefault("MEGADIFF_PYTHON", sys.executable)
    r = subprocess.run(command, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr.strip() or r.stdout.strip(), file=sys.stderr)
        return 2
    job = r.stdout.strip().split(";")[0]
    for i, point in enumerate(todo):
        print(f"  {job}_{i}: {point.name}")
    print(f"submitted job array {job} ({len(todo)} points); logs in <point>/{LOG_DIR}/")
    return 0
