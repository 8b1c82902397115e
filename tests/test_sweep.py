"""``megadiff sweep``: SPEC validation before any run, local runs that resume (a point killed
mid-run continues from its checkpoint, finished points are skipped) and ``sweep collect`` on
the real runs of a tiny model (synthetic data)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megadiff.cli import main
from megadiff.training.plot import read_records

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model.num_layers": 1,
    "model.hidden_size": 32,
    "model.num_attention_heads": 2,
    "model.ffn_hidden_size": 64,
    "model.seq_length": 32,
    "train.micro_batch": 4,
    "train.global_batch": 4,
    "eval.every": 50,
    "eval.batches": 1,
    "eval.batch_size": 4,
    "logging.every": 5,
    "logging.progress": False,
    "checkpoint.every": 20,
}
LONG_STEPS = 120


def write_spec(folder: Path, **spec) -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep(*argv: str) -> int:
    return main(["sweep", *argv])


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"dir": "x", "grids": {}}, ["unknown key 'grids'"]),
        ({"grid": {"train.steps": [1]}}, ["'dir'", "required"]),
        (
            {"dir": "x", "grid": {"model.hidden_size": [32, 30]}},
            ["point 'hidden_size-30'", "model.hidden_size", "head dim 15"],
        ),
        (
            {"dir": "x", "points": [{"name": "a"}, {"name": "b", "model.hiden_size": 64}]},
            ["point 'b'", "model.hiden_size", "did you mean 'model.hidden_size'"],
        ),
        (
            {"dir": "x", "grid": {"data.streams.web.proportion": [0.5]}},
            ["data.streams.web.proportion", "no stream 'web'"],
        ),
        ({"dir": "x", "grid": {"train.steps": 5}}, ["grid axis 'train.steps'", "list"]),
        ({"dir": "x", "slurm": {"partition": "a"}}, ["unknown key 'slurm.partition'"]),
    ],
)
def test_bad_spec_exits_2_before_any_run(tmp_path, capsys, spec, words):
    spec = {**spec, "set": TINY} if "dir" in spec else spec
    if "dir" in spec:
        spec["dir"] = str(tmp_path / "sweep")
    path = write_spec(tmp_path, **spec)
    assert sweep(str(path), "--local", "1") == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "sweep").exists()  # nothing was written or run


def test_names_are_stable_and_readable(tmp_path, capsys):
    spec = write_spec(
        tmp_path,
        dir=str(tmp_path / "sweep"),
        set=TINY,
        grid={"model.hidden_size": [32, 64], "train.steps": [10]},
        points=[{}, {"name": "lr-high", "optim.lr": 0.01}],
    )
    assert sweep(str(spec), "--dry") == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()[2:-1]]
    assert names == [
        "hidden_size-32_steps-10",
        "lr-high_hidden_size-32_steps-10",
        "hidden_size-64_steps-10",
        "lr-high_hidden_size-64_steps-10",
    ]
    # width 32, 1 layer, ffn 64: QKV + projection 4 h^2 = 4,096, SwiGLU 3 h f = 6,144, two
    # RMSNorm weights in the layer and the final one 3 x 32; embedding + output 2 x 512 x 32
    assert out.splitlines()[2].split()[2:4] == ["10,336", "43,104"]


def metrics(run_dir: Path) -> list[dict]:
    """The records of ``metrics.jsonl``; a line the run is writing right now is skipped (the
    sweep is polled while it trains, and a read can end inside an appended line)."""
    return read_records(run_dir / "metrics.jsonl")


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r.get("step", 0) >= step for r in metrics(run_dir)[-3:]):
            return
        time.sleep(0.5)
    pytest.fail(f"no step {step} in {run_dir} after {timeout} s")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A two-point sweep killed (SIGKILL, sweep and run) while the long point trains, then run
    again: ``(sweep dir, output of the second run, its exit code)``."""
    folder = tmp_path_factory.mktemp("sweep")
    spec = write_spec(
        folder,
        dir=str(folder / "sweep"),
        set=TINY,
        points=[{"name": "short", "train.steps": 10}, {"name": "long", "train.steps": LONG_STEPS}],
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "megadiff", "sweep", str(spec), "--local", "1"]
    proc = subprocess.Popen(
        command, cwd=folder, env=env, start_new_session=True, stdout=subprocess.DEVNULL
    )
    try:
        wait_for_step(folder / "sweep" / "long", 45, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    r = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    return folder / "sweep", r.stdout + r.stderr, r.returncode


def test_killed_point_resumes_and_finished_point_is_skipped(resumed):
    sweep_dir, out, code = resumed
    assert code == 0, out
    assert "short: finished, skipped" in out and "long: exit code 0" in out, out
    log = (sweep_dir / "long" / "logs" / "rank-0.log").read_text()
    assert "resumed from" in log and "at step 40" in log, log[-2000:]
    steps = [r["step"] for r in metrics(sweep_dir / "long") if "loss" in r]
    assert steps == list(range(1, LONG_STEPS + 1))  # every step once after the resume
    assert (sweep_dir / "short" / "logs" / "rank-0.log").read_text().count("megadiff: ") >= 1


def test_collect_reads_the_real_runs(resumed, capsys):
    sweep_dir, _, _ = resumed
    assert sweep("collect", str(sweep_dir)) == 0
    with open(sweep_dir / "results.csv", newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    jsonl = [json.loads(line) for line in (sweep_dir / "results.jsonl").read_text().splitlines()]
    assert set(rows) == {"short", "long"} and [r["name"] for r in jsonl] == ["short", "long"]
    for name, steps in (("short", 10), ("long", LONG_STEPS)):
        row = rows[name]
        vals = [r for r in metrics(sweep_dir / name) if "val_loss" in r]
        assert float(row["loss"]) == pytest.approx(vals[-1]["val_loss"], rel=1e-12)
        assert float(row["best_val_loss"]) == pytest.approx(min(r["val_loss"] for r in vals))
        assert int(row["step"]) == steps and int(row["tokens"]) == steps * 4 * 32
        assert int(row["train.steps"]) == steps
        for key in ("val_loss_text", "val_loss_image", "val_loss_audio"):
            assert float(row[key]) == pytest.approx(vals[-1][key])
        # 1 layer of width 32, ffn 64, synthetic vocab 512: 2 x 512 x 32 embedding rows
        assert int(row["params_total"]) - int(row["params"]) == 2 * 512 * 32
        assert int(row["flops"]) > 6 * int(row["params"]) * int(row["tokens"])


def test_collect_of_a_folder_that_is_no_sweep(tmp_path, capsys):
    assert sweep("collect", str(tmp_path)) == 2
    assert "is not a sweep folder" in capsys.readouterr().err


def test_failed_point_is_listed_with_its_log(tmp_path, capsys):
    """A point that passes validation but fails at start-up (a missing checkpoint.load)."""
    spec = write_spec(
        tmp_path,
        dir=str(tmp_path / "sweep"),
        set=TINY,
        points=[{"name": "bad", "checkpoint.load": str(tmp_path / "nowhere")}],
    )
    assert sweep(str(spec), "--local", "1") == 1
    log = tmp_path / "sweep" / "bad" / "logs" / "rank-0.log"
    assert f"failed: bad (exit code 2); log: {log}" in capsys.readouterr().out
    assert "nowhere" in log.read_text()
