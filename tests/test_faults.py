"""Non-finite steps (skip / stop), the wall-clock budget and stop signals."""

from __future__ import annotations

import math
import signal

import torch

from megadiff.parallel.launch import run_world
from megadiff.training.faults import EXIT_NONFINITE, EXIT_REQUEUE, StopRequest
from tests.workers import faults_run


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_skip_counts_and_does_not_update(tmp_path):
    overrides = ["train.steps=4", "train.nonfinite=skip", "checkpoint.save_on_exit=false"]
    r = run_world(faults_run, 1, (overrides, str(tmp_path), [2]))[0]
    assert r["exit_code"] == 0 and r["step"] == 4 and r["nonfinite_steps"] == 1
    snaps = r["snapshots"]
    assert _same(snaps[1], snaps[2])  # the NaN step left the weights alone
    assert not _same(snaps[2], snaps[3])  # and training went on
    assert all(math.isfinite(x) for x in snaps[4]["output_layer.weight"].flatten().tolist())
    by_step = {m["step"]: m for m in r["metrics"]}
    assert sorted(by_step) == [1, 2, 3, 4]
    assert by_step[2]["nonfinite"] is True and by_step[2]["skipped"] is True
    assert math.isfinite(by_step[3]["loss"]) and not by_step[3]["skipped"]
    assert not (tmp_path / "checkpoints").exists()


def test_nonfinite_stop_saves_last_good_step(tmp_path):
    overrides = ["train.steps=4", "train.nonfinite=stop"]
    r = run_world(faults_run, 1, (overrides, str(tmp_path), [3]))[0]
    assert r["exit_code"] == EXIT_NONFINITE == 3
    assert r["step"] == 2
    assert [m["step"] for m in r["metrics"]] == [1, 2]  # the bad step is not recorded
    assert _same(r["snapshots"][2], r["snapshots"][r["step"]])
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_00000002"]
    assert (tmp_path / "checkpoints" / "step_00000002" / "manifest.json").is_file()


def test_time_budget_saves_and_exits_for_requeue(tmp_path):
    overrides = ["train.steps=50", "train.exit_after_minutes=1e-5"]  # 0.6 ms: one step
    r = run_world(faults_run, 1, (overrides, str(tmp_path), []))[0]
    assert r["exit_code"] == EXIT_REQUEUE == 75
    assert r["step"] == 1
    assert (tmp_path / "checkpoints" / "step_00000001" / "manifest.json").is_file()


def test_stop_request_catches_usr1_and_term():
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        stop = StopRequest().install()
        try:
            assert not stop.should_stop()
            signal.raise_signal(sig)  # would kill the process without the handler
            assert stop.should_stop() and signal.Signals(sig).name in stop.reason
        finally:
            stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
