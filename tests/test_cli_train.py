"""The real ``megadiff train`` command: single process and under torchrun (TP=2) agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.workers import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train(cmd: list[str], run_dir, extra: list[str]) -> subprocess.CompletedProcess:
    args = [*cmd, "train", *TINY, "train.steps=4", f"run.dir={run_dir}", *extra]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_torchrun_tp2_matches_single_process(tmp_path):
    single = tmp_path / "single"
    tp2 = tmp_path / "tp2"
    _train([sys.executable, "-m", "megadiff"], single, [])
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "megadiff",
    ]
    r = _train(torchrun, tp2, ["parallel.tensor_parallel=2"])
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in r.stderr  # GPU-only advice, silenced on CPU
    a, b = _metrics(single), _metrics(tp2)
    assert [r["step"] for r in a] == [1, 2, 3, 4] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(ra["loss"]), (ra, rb)
        assert ra["tokens"] == rb["tokens"] == ra["step"] * 4 * 16
        for key in ("lr", "tokens_per_s", "loss_text", "loss_image", "loss_audio"):
            assert key in ra and key in rb
    assert (tp2 / "config.yaml").exists()


def _strict_json(line: str):
    """``json.loads`` that refuses NaN/Infinity (as a strict JSON reader would)."""

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_diverged_run_stops_after_the_nonfinite_streak(tmp_path):
    """Every step non-finite (a huge init): `train.nonfinite=skip` stops with exit 3 after
    `train.max_nonfinite_streak` steps in a row and saves, instead of skipping to the end and
    exiting 0; metrics.jsonl stays strict JSON (the NaN grad norm is null)."""
    run_dir = tmp_path / "run"
    huge_init = ["model.init_method_std=1e30", "train.max_nonfinite_streak=3"]
    args = [sys.executable, "-m", "megadiff", "train", *TINY, "train.steps=20", *huge_init]
    args.append(f"run.dir={run_dir}")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert "3 non-finite steps in a row (train.max_nonfinite_streak=3)" in r.stdout + r.stderr
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [_strict_json(line) for line in lines]
    assert [m["step"] for m in records] == [1, 2, 3]
    assert all(m["skipped"] and m["grad_norm"] is None for m in records)
    assert (run_dir / "checkpoints" / "step_00000003" / "manifest.json").is_file()


def test_metrics_jsonl_writes_non_finite_numbers_as_null(tmp_path):
    from megadiff.training.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, 2, enabled=True, progress=False)
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "x": [float("-inf")]})
    log.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert _strict_json(line) == {"step": 1, "loss": None, "grad_norm": None, "x": [None]}
