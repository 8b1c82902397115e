"""Checkpoints: exact resume after SIGKILL, resharding, corrupt-checkpoint fallback, bad loads."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from megadiff.parallel.launch import free_port, run_world
from tests.workers import TINY, final_params, session, train_capture

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))
    }
    env.update(PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", **extra)
    return env


def launch(args: list[str], world: int, log_dir: Path) -> list[subprocess.Popen]:
    """``python -m megadiff train ARGS`` as ``world`` torchrun-style processes (own sessions)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = _env(
            dict(
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
        )
        out = open(log_dir / f"rank{rank}.log", "a")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "megadiff", "train", *TINY, *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a kill reaches the checkpoint writer helpers too
            )
        )
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 240) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
    return codes


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            out.append(json.loads(line))
    return out


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout=180) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in metrics(run_dir)):
        assert all(p.poll() is None for p in procs), "training exited early"
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.05)


def kill_group(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        os.killpg(p.pid, sig)


def test_sigkill_and_restart_is_bit_identical(tmp_path):
    """2 ranks (DP2, distributed optimizer): SIGKILL mid-run, rerun the same command."""
    ref = run_world(train_capture, 2, ([f"train.steps={STEPS}"], STEPS, str(tmp_path / "ref")))
    ref_losses = ref[0]["losses"]

    run_dir = tmp_path / "run"
    args = [f"run.dir={run_dir}", f"train.steps={STEPS}", "checkpoint.every=2"]
    procs = launch(args, 2, tmp_path)
    wait_for_step(run_dir, 3, procs)  # past the step-2 checkpoint, before the end
    kill_group(procs, signal.SIGKILL)
    wait_all(procs)
    assert any(r["step"] >= 3 for r in metrics(run_dir))
    procs = launch(args, 2, tmp_path)
    assert wait_all(procs) == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]

    log = (tmp_path / "rank0.log").read_text()
    assert "resumed from" in log
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # no duplicates
    assert [r["loss"] for r in records] == ref_losses  # bit-identical

    final = run_world(final_params, 2, ([f"train.steps={STEPS}"], str(run_dir)))[0]
    assert final["step"] == STEPS
    for name, want in ref[0]["params"].items():
        assert torch.equal(final["params"][name], want), name


TP2PP2 = ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]
RTOL = 1e-5


def _last_stage(result: list[dict]) -> dict:
    return next(r for r in result if r["eval"] is not None)


def test_reshard_tp1_to_tp2pp2_and_back(tmp_path):
    """Save at TP1xPP1, load at TP2xPP2 (and save there), load that at TP1xPP1 again.

    The eval loss of the restored step and the losses of two further steps (which need the
    resharded Adam state) agree across the three layouts.
    """
    a, b, c = (str(tmp_path / n) for n in "abc")
    ra = _last_stage(run_world(session, 1, ([], a, 2, True, 2)))
    load_a = f"checkpoint.load={a}/checkpoints/step_00000002"
    rb = _last_stage(run_world(session, 4, ([*TP2PP2, load_a], b, 0, True, 2)))
    load_b = f"checkpoint.load={b}/checkpoints"  # a run's checkpoint directory: newest valid
    rc = _last_stage(run_world(session, 1, ([load_b], c, 0, False, 2)))
    assert ra["start"] == 0 and rb["start"] == 2 and rc["start"] == 2
    want = ra["eval"]["loss"]
    for r in (rb, rc):
        assert abs(r["eval"]["loss"] - want) <= RTOL * abs(want)
        for x, y in zip(r["losses"], ra["losses"], strict=True):
            assert abs(x - y) <= RTOL * abs(y)
    assert ra["losses"][1] != ra["losses"][0]  # the comparison is not vacuous
