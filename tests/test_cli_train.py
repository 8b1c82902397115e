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
    _train(torchrun, tp2, ["parallel.tensor_parallel=2"])
    a, b = _metrics(single), _metrics(tp2)
    assert [r["step"] for r in a] == [1, 2, 3, 4] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(ra["loss"]), (ra, rb)
        assert ra["tokens"] == rb["tokens"] == ra["step"] * 4 * 16
        for key in ("lr", "tokens_per_s", "loss_text", "loss_image", "loss_audio"):
            assert key in ra and key in rb
    assert (tp2 / "config.yaml").exists()
