"""``run_world``: N local ranks as a torch.distributed world, and its rendezvous port."""

from __future__ import annotations

import socket

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
