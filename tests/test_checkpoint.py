"""Checkpoints: exact resume after SIGKILL, resharding, corrupt-checkpoint fallback, bad loads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from megadiff.checkpoint_files import verify
from megadiff.parallel.launch import free_port, run_world
from megadiff.training.plot import read_records
from tests.workers import (
    TINY,
    cli_main,
    final_params,
    fit_run,
    read_model,
    save_until_disk_full,
    session,
    train_capture,
)

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


def launch(
    args: list[str], world: int, log_dir: Path, prefix: Sequence[str] = ()
) -> list[subprocess.Popen]:
    """``[PREFIX] python -m megadiff train ARGS`` as ``world`` torchrun-style processes (own
    sessions)."""
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
                [*prefix, sys.executable, "-m", "megadiff", "train", *TINY, *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a kill reaches the checkpoint writer helpers too
            )
        )
    return procs


def cli_world(
    args: list[str],
    world: int = 1,
    log_dir: Path | None = None,
    command: Sequence[str] = ("train", *TINY),
    timeout: float = 300.0,
) -> list[subprocess.CompletedProcess]:
    """``megadiff COMMAND ARGS`` as ``world`` ranks of a gloo world started the way torchrun
    starts them (RANK, WORLD_SIZE, MASTER_*), in processes with megatron-core already imported:
    per rank, the exit code and output (both appended to ``log_dir/rank<r>.log`` when given).
    For runs that are not signalled; :func:`launch` starts the real command."""
    argv = [*command, *args]
    with tempfile.TemporaryDirectory() as tmp:
        if log_dir is None:
            out, err = f"{tmp}/{{rank}}.out", f"{tmp}/{{rank}}.err"
        else:
            out = err = str(log_dir / "rank{rank}.log")
        codes = run_world(cli_main, world, (argv, out, err, str(ROOT)), timeout=timeout)
        text = [(Path(out.format(rank=r)), Path(err.format(rank=r))) for r in range(world)]
        return [
            subprocess.CompletedProcess(argv, code, o.read_text(), e.read_text())
            for code, (o, e) in zip(codes, text, strict=True)
        ]


def wait_all(procs: list[subprocess.Popen], timeout: float = 240) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
    return codes


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return read_records(path) if path.is_file() else []  # skips a line being written


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout=180) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in metrics(run_dir)):
        assert all(p.poll() is None for p in procs), "training exited early"
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.05)


def kill_group(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        os.killpg(p.pid, sig)


def stop_with(
    proc: subprocess.Popen, sig: int, wait: Path | float, group: bool = True, timeout=120
) -> int:
    """Send ``sig`` once the run at ``wait`` (a run directory) has logged step 4, or after
    ``wait`` seconds; to ``proc``'s process group (its own session) unless ``group`` is false.
    Returns the exit code; a process still running at the end is SIGKILLed."""
    try:
        if isinstance(wait, Path):
            wait_for_step(wait, 4, [proc])
        else:
            time.sleep(wait)
            assert proc.poll() is None
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            if group:
                os.killpg(proc.pid, signal.SIGKILL)


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
    codes = [r.returncode for r in cli_world(args, 2, tmp_path)]
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]

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
    """Save at TP1xPP1 (1 rank), load at TP2xPP2 (and save there), load that at TP1xPP1xDP2.

    The eval loss of the restored step and the losses of two further steps (which need the
    resharded Adam state) agree across the three layouts.
    """
    a, b, c = (str(tmp_path / n) for n in "abc")
    ra = _last_stage(run_world(session, 1, ([], a, 2, True, 2)))
    load_a = f"checkpoint.load={a}/checkpoints/step_00000002"
    rb = _last_stage(run_world(session, 4, ([*TP2PP2, load_a], b, 0, True, 2)))
    load_b = f"checkpoint.load={b}/checkpoints"  # a run's checkpoint directory: newest valid
    rc = _last_stage(run_world(session, 2, ([load_b], c, 0, False, 2)))  # DP2: ZeRO shards
    assert ra["start"] == 0 and rb["start"] == 2 and rc["start"] == 2
    want = ra["eval"]["loss"]
    for r in (rb, rc):
        assert abs(r["eval"]["loss"] - want) <= RTOL * abs(want)
        for x, y in zip(r["losses"], ra["losses"], strict=True):
            assert abs(x - y) <= RTOL * abs(y)
    assert ra["losses"][1] != ra["losses"][0]  # the comparison is not vacuous


def test_read_checkpoint_model_from_tp2pp2(tmp_path):
    """One process reads a TP2xPP2 checkpoint's weights: equal to the trainer's own resume."""
    layout = [*TP2PP2, "parallel.virtual_pipeline=2", "model.num_layers=4"]
    run = str(tmp_path / "run")
    run_world(session, 4, (layout, run, 2, True, 1))
    got = run_world(read_model, 1, (run,))[0]  # the run directory: newest valid checkpoint
    assert got["step"] == 2 and got["tp"] == 1
    ref = run_world(final_params, 4, (layout, run))  # the trainer's own resume at TP2xPP2
    assert ref[0]["step"] == 2
    assert got["params"].keys() == ref[0]["params"].keys()
    for k, v in ref[0]["params"].items():
        assert torch.equal(got["params"][k], v), k
    fresh = run_world(final_params, 1, (["model.num_layers=4"], str(tmp_path / "fresh")))[0][
        "params"
    ]
    assert any(not torch.equal(fresh[k], v) for k, v in got["params"].items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="reads a GPU run's checkpoint on CPU")
def test_read_checkpoint_model_of_a_bf16_run_on_cpu(tmp_path):
    """A run trained with train.precision=bf16 (on GPUs) is read on a CPU box (generate,
    convert): its parameters come back in fp32 instead of 'bf16 needs a GPU'."""
    import yaml

    from megadiff.checkpoint_files import write_manifest

    run = tmp_path / "run"
    (r,) = cli_world([f"run.dir={run}", "train.steps=1"])
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = run / "checkpoints" / "step_00000001"
    want = run_world(read_model, 1, (str(ckpt),))[0]["params"]
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["train"]["precision"] = "bf16"  # as written by a GPU run
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    write_manifest(ckpt, 1)
    got = run_world(read_model, 1, (str(ckpt),))[0]["params"]
    assert got.keys() == want.keys()
    assert all(v.dtype == torch.float32 and torch.equal(v, want[k]) for k, v in got.items())


def test_read_checkpoint_model_rejects_other_paths(tmp_path):
    from megadiff.checkpoint_files import CheckpointError
    from megadiff.model.reader import read_checkpoint_model

    (tmp_path / "x.txt").write_text("hi")
    for bad in (tmp_path, tmp_path / "missing"):
        try:
            read_checkpoint_model(bad)
        except CheckpointError as e:
            assert str(bad) in str(e)
        else:
            raise AssertionError(f"{bad} accepted")


def without_root_file_access() -> list[str]:
    """A command prefix under which file permissions apply to this user (root: without the
    capabilities that bypass them); skips the test where that is not possible."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot be enforced")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", "--bounding-set", caps, "--inh-caps", caps]


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    """Truncated, deleted, then unreadable shard in the newest checkpoint: resume from the
    previous one; the damaged checkpoint is moved aside."""
    run_dir = tmp_path / "run"
    ck = run_dir / "checkpoints"
    args = [f"run.dir={run_dir}", "train.steps=4", "checkpoint.every=2", "checkpoint.keep=3"]
    log = tmp_path / "rank0.log"
    assert cli_world(args, 1, tmp_path)[0].returncode == 0, log.read_text()[-3000:]
    before = metrics(run_dir)
    assert [r["step"] for r in before] == [1, 2, 3, 4]

    for damage in ("truncate", "delete", "unreadable"):
        shard = sorted((ck / "step_00000004").glob("*.distcp"))[-1]
        log.unlink()
        if damage == "truncate":
            shard.write_bytes(shard.read_bytes()[:-7])
            codes = [r.returncode for r in cli_world(args, 1, tmp_path)]
        elif damage == "delete":
            shard.unlink()
            codes = [r.returncode for r in cli_world(args, 1, tmp_path)]
        else:  # the real command, without the permission-bypassing capabilities
            shard.chmod(0)
            codes = wait_all(launch(args, 1, tmp_path, without_root_file_access()))
        assert codes == [0], log.read_text()[-3000:]
        text = log.read_text()
        assert "step_00000004 is unusable" in text and str(shard) in text, text[-3000:]
        if damage == "unreadable":
            assert "cannot be read (Permission denied)" in text, text[-3000:]
        assert f"resumed from {ck / 'step_00000002'} at step 2" in text
        after = metrics(run_dir)
        assert [r["step"] for r in after] == [1, 2, 3, 4]
        assert [r["loss"] for r in after] == [r["loss"] for r in before]  # same steps again
        assert (ck / "step_00000002" / "manifest.json").is_file()
        assert (ck / "step_00000004" / "manifest.json").is_file()
    # nothing is lost: the damaged checkpoints are kept aside, not deleted
    assert len(list(ck.glob("corrupt-step_00000004-*"))) == 3


def test_pruning_never_removes_the_newest_valid_checkpoint(tmp_path):
    """keep=1 and a corrupt checkpoint newer than the one resumed from: the corrupt one is moved
    aside at resume, and the run's fresh checkpoint is the one kept."""
    run_dir = tmp_path / "run"
    ck = run_dir / "checkpoints"
    (r,) = cli_world([f"run.dir={run_dir}", "train.steps=4", "checkpoint.every=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    shard = sorted((ck / "step_00000004").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:-7])
    (r,) = cli_world([f"run.dir={run_dir}", "train.steps=3", "checkpoint.keep=1"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ck / 'step_00000002'} at step 2" in r.stdout, r.stdout[-3000:]
    assert [p.name for p in ck.iterdir() if p.name.startswith("step_")] == ["step_00000003"]
    assert verify(ck / "step_00000003") is None
    aside = list(ck.glob("corrupt-step_00000004-*"))
    assert len(aside) == 1 and str(aside[0]) in r.stdout, r.stdout[-3000:]


def _run_cli(
    args: list[str], timeout: float = 120, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "megadiff", "train", *TINY, *args],
        cwd=ROOT,
        env=_env({}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_load_with_optimizer_takes_the_new_config_lr(tmp_path):
    """checkpoint.load with the optimizer state: the Adam moments come from the checkpoint, the
    learning rate from this run's config (megatron's param groups carry their own max_lr)."""
    a, b = tmp_path / "a", tmp_path / "b"
    (r,) = cli_world([f"run.dir={a}", "train.steps=2", "optim.lr=1e-3", "optim.schedule=constant"])
    assert r.returncode == 0, r.stderr[-2000:]
    (r,) = cli_world(
        [
            f"run.dir={b}",
            f"checkpoint.load={a}/checkpoints",
            "checkpoint.reset_step=true",
            "train.steps=2",
            "optim.lr=3e-4",
            "optim.schedule=constant",
        ]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    lrs = [x["lr"] for x in rows if "lr" in x]
    assert lrs and all(abs(v - 3e-4) < 1e-12 for v in lrs), lrs


def test_bad_checkpoint_load_fails_before_training(tmp_path):
    not_ckpt = tmp_path / "not_a_checkpoint"
    not_ckpt.mkdir()
    (not_ckpt / "notes.txt").write_text("hello")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "common.pt").write_bytes(b"12345")
    manifest = {
        "format": "megadiff-checkpoint-1",
        "step": 2,
        "files": {"common.pt": {"size": 999, "sha256": "0" * 64}},
    }
    (corrupt / "manifest.json").write_text(json.dumps(manifest))
    for path, names in (
        (tmp_path / "missing", ["missing"]),
        (not_ckpt, [str(not_ckpt), "manifest.json"]),
        (corrupt, [str(corrupt / "common.pt")]),
    ):
        run_dir = tmp_path / f"run_{path.name}"
        (r,) = cli_world([f"run.dir={run_dir}", f"checkpoint.load={path}", "train.steps=2"])
        assert r.returncode == 2, r.stderr[-2000:]
        for name in names:
            assert name in r.stderr, r.stderr[-2000:]
        assert not (run_dir / "metrics.jsonl").exists()


def test_sigterm_under_slurm_saves_and_exits_for_requeue(tmp_path):
    """Two ranks launched the way srun does (SLURM_* only); SIGTERM reaches rank 1 only."""
    run_dir = tmp_path / "run"
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = _env(
            dict(
                SLURM_PROCID=str(rank),
                SLURM_NTASKS="2",
                SLURM_LOCALID=str(rank),
                SLURM_NODEID="0",
                SLURM_JOB_ID="4242",
                SLURM_JOB_NODELIST="localhost",
                MASTER_PORT=port,
            )
        )
        out = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "megadiff", "train", *TINY]
                + [f"run.dir={run_dir}", "train.steps=100000", "parallel.tensor_parallel=2"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    try:
        wait_for_step(run_dir, 2, procs)
        procs[1].send_signal(signal.SIGTERM)
        codes = wait_all(procs, timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    log = (tmp_path / "rank0.log").read_text()
    assert codes == [75, 75], log[-3000:]
    assert "world 2 = TP 2 x PP 1 x DP 1" in log  # the Slurm variables made the world
    last = metrics(run_dir)[-1]["step"]
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == [f"step_{last:08d}"]
    manifest = json.loads((ckpts[0] / "manifest.json").read_text())
    assert manifest["step"] == last and len(manifest["files"]) >= 5
    for name, entry in manifest["files"].items():
        assert (ckpts[0] / name).stat().st_size == entry["size"], name


def test_async_save_snapshots_the_saved_step(tmp_path):
    """Background writes while training goes on: step 4's checkpoint continues like step 4."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    overrides = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep=3"]
    ra = run_world(fit_run, 2, ([*overrides, "checkpoint.async_save=true"], a))
    losses = next(r["losses"] for r in ra if r["losses"] is not None)
    ckpts = tmp_path / "a" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step_0000000{s}" for s in (2, 4, 6)]
    assert all((p / "manifest.json").is_file() for p in ckpts.iterdir())
    load = f"checkpoint.load={ckpts / 'step_00000004'}"
    rb = run_world(session, 2, ([*overrides, load], b, 0, False, 2))
    after = next(r["losses"] for r in rb if r["losses"] is not None)
    assert after == losses[4:]  # bit-identical steps 5 and 6


@pytest.mark.parametrize(
    ("sig", "extra"),
    [(signal.SIGTERM, []), (signal.SIGUSR1, ["checkpoint.async_save=true"])],
    ids=["sigterm-sync", "sigusr1-async"],
)
def test_stop_signal_to_the_process_group_after_earlier_saves(tmp_path, sig, extra):
    """The signal reaches every process of the group, as Slurm, scancel and torchrun send it:
    megatron-core's checkpoint writers (started at the first save) survive it, and the run
    saves its stop step and exits 75."""
    run_dir = tmp_path / "run"
    args = [f"run.dir={run_dir}", "train.steps=100000", "checkpoint.every=3", *extra]
    (proc,) = launch(args, 1, tmp_path)
    code = stop_with(proc, sig, run_dir)  # step 4: after the step-3 save started the writers
    log = (tmp_path / "rank0.log").read_text()
    assert code == 75, log[-3000:]
    stop = metrics(run_dir)[-1]["step"]
    root = run_dir / "checkpoints"
    assert not list(root.glob(".tmp_*"))
    assert verify(root / f"step_{stop:08d}") is None


def test_stop_signal_during_start_up_is_honoured(tmp_path):
    """SIGUSR1 while megadiff is still importing and building: no death by signal; the run
    stops before its first step and exits 75."""
    run_dir = tmp_path / "run"
    (proc,) = launch([f"run.dir={run_dir}", "train.steps=100000"], 1, tmp_path)
    # 1.5 s: inside the imports (megatron-core alone takes seconds)
    code = stop_with(proc, signal.SIGUSR1, 1.5, group=False)
    log = (tmp_path / "rank0.log").read_text()
    assert code == 75, log[-3000:]
    assert "stopping before step 1: received SIGUSR1" in log
    assert metrics(run_dir) == []


def test_ctrl_c_saves_and_exits_130(tmp_path):
    """SIGINT (Ctrl-C) to the process group: the stop step is saved, exit 130, no traceback."""
    run_dir = tmp_path / "run"
    (proc,) = launch(
        [f"run.dir={run_dir}", "train.steps=100000", "checkpoint.every=3"], 1, tmp_path
    )
    code = stop_with(proc, signal.SIGINT, run_dir)
    log = (tmp_path / "rank0.log").read_text()
    assert code == 130, log[-3000:]
    assert "received SIGINT" in log and "Traceback" not in log
    stop = metrics(run_dir)[-1]["step"]
    assert verify(run_dir / "checkpoints" / f"step_{stop:08d}") is None


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs mounted at ``tmp_path/tmpfs`` (needs root; skipped where mounting fails)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_full_during_save_names_the_space_and_keeps_the_previous(mode, tmp_path, small_tmpfs):
    ckpt = small_tmpfs / "ckpt"
    over = [f"checkpoint.async_save={mode == 'async'}"]
    r = run_world(save_until_disk_full, 1, (over, str(tmp_path / "run"), str(ckpt)))[0]
    assert r["error"] is not None, "the save on a full disk did not fail"
    kind, message = r["error"]
    assert kind == "CheckpointError", message
    assert f"no space left on {ckpt}" in message and "need ~" in message, message
    assert "have " in message and str(ckpt / "step_00000001") in message, message
    assert r["left"] == ["step_00000001"]  # the partial save is gone, the previous one intact
    assert r["problems"] == {str(ckpt / "step_00000001"): None}


def test_distributed_optimizer_checkpoint_into_a_plain_optimizer_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (r,) = cli_world([f"run.dir={a}", "train.steps=1"])
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = a / "checkpoints" / "step_00000001"
    load = [f"checkpoint.load={a}/checkpoints", "train.steps=2"]
    (r,) = cli_world([f"run.dir={b}", *load, "parallel.distributed_optimizer=false"])
    assert r.returncode == 2, r.stderr[-2000:]
    for words in (str(ckpt), "parallel.distributed_optimizer=true", "load_optimizer=false"):
        assert words in r.stderr, r.stderr[-2000:]
    assert "parameters" not in r.stdout  # refused before the model was built
    assert not (b / "metrics.jsonl").exists()


def test_unwritable_checkpoint_dir_is_refused_before_training(tmp_path):
    locked = tmp_path / "read_only"
    locked.mkdir()
    locked.chmod(0o555)
    run_dir = tmp_path / "run"
    args = [f"run.dir={run_dir}", f"checkpoint.dir={locked / 'ckpt'}", "train.steps=2"]
    r = _run_cli(args, prefix=without_root_file_access())
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"checkpoint directory {locked / 'ckpt'} is not writable" in r.stderr, r.stderr
    assert not (run_dir / "metrics.jsonl").exists()


def test_too_little_space_for_a_checkpoint_is_refused_before_training(tmp_path, small_tmpfs):
    (small_tmpfs / "filler").write_bytes(b"\0" * (shutil.disk_usage(small_tmpfs).free - 300_000))
    run_dir = tmp_path / "run"
    (r,) = cli_world([f"run.dir={run_dir}", f"checkpoint.dir={small_tmpfs}", "train.steps=2"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"not enough space for a checkpoint in {small_tmpfs}: need ~" in r.stderr, r.stderr
    assert "have 2" in r.stderr and "KiB" in r.stderr, r.stderr  # ~290 KiB left
    assert not (run_dir / "metrics.jsonl").exists()


def test_second_run_on_the_same_run_dir_is_refused(tmp_path):
    """A live run holds run.dir: a second one (here with 2 ranks) exits 2 naming its PID and
    host, before touching metrics.jsonl; once the first is SIGKILLed its lock is gone."""
    run_dir = tmp_path / "run"
    first = launch([f"run.dir={run_dir}", "train.steps=100000"], 1, tmp_path)
    try:
        wait_for_step(run_dir, 2, first)
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        second = cli_world([f"run.dir={run_dir}", "train.steps=2"], 2, second_dir)
        assert [r.returncode for r in second] == [2, 2]
        for rank in (0, 1):
            log = (second_dir / f"rank{rank}.log").read_text()
            holder = f"pid {first[0].pid} on host {socket.gethostname()}"
            assert f"{run_dir} is in use by another megadiff run ({holder}" in log, log
        steps = [r["step"] for r in metrics(run_dir)]
        assert steps[0] == 1 and steps == list(range(1, len(steps) + 1))  # history intact
        assert first[0].poll() is None
    finally:
        kill_group(first, signal.SIGKILL)
        wait_all(first)
    history = metrics(run_dir)
    (r,) = cli_world([f"run.dir={run_dir}", "train.steps=1", "checkpoint.save_on_exit=false"])
    assert r.returncode == 0, r.stderr[-2000:]  # the killed run's lock did not outlive it
    assert [x["step"] for x in metrics(run_dir)] == [1]  # a fresh start (no checkpoint) ...
    aside = (run_dir / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in aside] == history  # ... keeps the killed run's history
