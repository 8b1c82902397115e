"""The launch's rendezvous port: taken by another process, it is named (``megadiff train``
exits 2) and ``run_world`` starts its world again on a new one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megadiff.parallel import launch
from tests.workers import world_rank


def test_a_rendezvous_port_taken_in_between_is_retried_on_a_new_one(monkeypatch):
    """Another process takes the port picked free before rank 0 listens on it (EADDRINUSE):
    the world starts again on a new port; a world that fails otherwise is not retried."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        real, picked = launch.free_port, []

        def pick() -> int:  # the taken port first, then free ones
            picked.append(taken.getsockname()[1] if not picked else real())
            return picked[-1]

        monkeypatch.setattr(launch, "free_port", pick)
        assert launch.run_world(world_rank, 2) == [0, 1]
        assert len(picked) == 2 and picked[1] != picked[0]  # started twice
        picked.clear()
        with pytest.raises(RuntimeError, match="EADDRINUSE"):
            launch.run_world(world_rank, 2, attempts=1)


def test_a_failing_world_is_not_started_again(monkeypatch):
    starts = []
    real = launch._run_once
    monkeypatch.setattr(launch, "_run_once", lambda *a: starts.append(a) or real(*a))
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        launch.run_world(divide_by_zero, 2)
    assert len(starts) == 1


def divide_by_zero() -> None:
    raise ZeroDivisionError("a rank's own failure")


def test_train_names_a_master_port_in_use_and_exits_2(tmp_path):
    """Rank 0 of a 2-rank launch (srun-style environment) whose MASTER_PORT another process
    holds: exit 2 naming MASTER_PORT and what to do, no traceback, nothing trained."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(
            os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), PYTHONPATH=str(Path(__file__).parents[1]),
        )  # fmt: skip
        tiny = str(Path(__file__).parents[1] / "examples" / "tiny_cpu.yaml")
        r = subprocess.run(
            [sys.executable, "-m", "megadiff", "train", tiny, f"run.dir={tmp_path / 'run'}"],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"MASTER_ADDR:MASTER_PORT 127.0.0.1:{port}: the port is in use" in r.stderr
    assert "MASTER_PORT=P" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
