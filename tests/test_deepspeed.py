"""train.engine=deepspeed reproduces the megatron-core engine (2 gloo ranks, fp32, CPU).

Same init, data, noise, AdamW hyper-parameters, lr schedule and grad clipping (active: the
first step's grad norm is above optim.clip_grad); 2 micro-batches per rank are accumulated.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")

from megadiff.parallel.launch import run_world  # noqa: E402
from megadiff.training.deepspeed_engine import shm_leftovers  # noqa: E402
from tests.test_checkpoint import cli_world  # noqa: E402
from tests.workers import deepspeed_capture, train_capture  # noqa: E402

STEPS = 3
TINY_CPU = ("train", "examples/tiny_cpu.yaml")
RTOL = 1e-5  # relative, per-step loss and per-tensor max |a - b| / max |b|
SHAPE = ["train.global_batch=8", "optim.clip_grad=1.0", "optim.weight_decay=0.1"]


@pytest.fixture(scope="module")
def megatron(tmp_path_factory):
    """The megatron-core engine at DP = 2 (distributed optimizer)."""
    return run_world(train_capture, 2, (SHAPE, STEPS, str(tmp_path_factory.mktemp("mc"))))[0]


def _run_deepspeed(stage: int, tmp_path) -> dict:
    before = set(shm_leftovers())
    out = run_world(
        deepspeed_capture,
        2,
        ([*SHAPE, f"deepspeed.zero_stage={stage}"], STEPS, str(tmp_path)),
        env={"LOCAL_SIZE": "2"},  # all ranks local: where DeepSpeed's shm op leaves files
    )
    assert set(shm_leftovers()) - before == set(), "DeepSpeed left files in /dev/shm"
    return out[0]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * abs(b)


def test_zero2_matches_megatron_core(megatron, tmp_path):
    ds = _run_deepspeed(2, tmp_path)
    losses = [r["loss"] for r in ds["records"]]
    assert len(set(megatron["losses"])) == STEPS  # the model moves: steps differ
    for step, (a, b) in enumerate(zip(losses, megatron["losses"], strict=True)):
        assert _close(a, b), f"step {step + 1}: deepspeed {a} vs megatron-core {b}"
    assert ds["records"][0]["grad_norm"] > 1.0  # clipping was active
    assert ds["params"].keys() == megatron["params"].keys()
    for name, b in megatron["params"].items():
        a = ds["params"][name]
        rel = float((a - b).abs().max() / b.abs().max())
        assert rel <= RTOL, f"{name}: rel diff {rel:.2e}"
    rec = ds["records"][-1]
    assert rec["step"] == STEPS and rec["tokens"] == STEPS * 8 * 16
    assert {"loss_text", "lr", "grad_norm", "tokens_per_s"} <= rec.keys()


@pytest.mark.parametrize("stage", [1, 3])
def test_other_zero_stages_match(megatron, stage, tmp_path):
    losses = [r["loss"] for r in _run_deepspeed(stage, tmp_path)["records"]]
    for a, b in zip(losses, megatron["losses"], strict=True):
        assert _close(a, b), (stage, losses, megatron["losses"])


def test_different_hyperparameters_are_detected(megatron, tmp_path):
    """The comparison can fail: a different lr changes steps 2 and 3."""
    out = run_world(
        deepspeed_capture,
        2,
        ([*SHAPE, "optim.lr=2e-3", "deepspeed.zero_stage=2"], STEPS, str(tmp_path)),
    )[0]
    losses = [r["loss"] for r in out["records"]]
    assert _close(losses[0], megatron["losses"][0])
    assert not _close(losses[2], megatron["losses"][2])
    assert torch.isfinite(torch.tensor(losses)).all()


def test_cli_dispatches_to_deepspeed(tmp_path):
    """`megadiff train ... train.engine=deepspeed`: same metrics.jsonl contract, same losses."""
    runs = {}
    for engine in ("deepspeed", "megatron"):
        run_dir = tmp_path / engine
        (r,) = cli_world(
            ["train.steps=2", f"train.engine={engine}", f"run.dir={run_dir}"], command=TINY_CPU
        )
        assert r.returncode == 0, r.stderr[-3000:]
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        runs[engine] = [json.loads(line) for line in lines]
    ds, mc = runs["deepspeed"], runs["megatron"]
    assert [r["step"] for r in ds] == [1, 2] and ds[0].keys() == mc[0].keys()
    for a, b in zip(ds, mc, strict=True):
        assert _close(a["loss"], b["loss"]) and a["tokens"] == b["tokens"]


def test_completep_groups_match_megatron_core(tmp_path):
    """CompleteP's per-group lr/eps (not at the base shape) reach DeepSpeed's optimizer too."""
    cp = [*SHAPE, "model.parameterization=completep", "model.base_hidden_size=8"]
    cp += ["model.base_num_layers=2"]
    mc = run_world(train_capture, 1, (cp, STEPS, str(tmp_path / "mc")))[0]["losses"]
    ds = run_world(deepspeed_capture, 1, (cp, STEPS, str(tmp_path / "ds")))[0]["records"]
    plain = run_world(train_capture, 1, (SHAPE, STEPS, str(tmp_path / "plain")))[0]["losses"]
    for a, b in zip([r["loss"] for r in ds], mc, strict=True):
        assert _close(a, b), (ds, mc)
    assert not _close(mc[2], plain[2])  # completep really differs from standard here


# ----------------------------------------------------------------------------- the shared loop


def test_sigkill_and_restart_is_bit_identical(tmp_path):
    """2 ranks, 2 micro-batches each: SIGKILL mid-run, the same command again resumes from the
    last checkpoint (DeepSpeed's optimizer partitions + the shared state) and every step's loss
    equals the uninterrupted run's."""
    from tests.test_checkpoint import kill_group, launch, metrics, wait_all, wait_for_step

    steps = 6
    args = ["train.engine=deepspeed", *SHAPE, f"train.steps={steps}", "checkpoint.every=2"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    assert [r.returncode for r in cli_world([*args, f"run.dir={ref_dir}"], 2)] == [0, 0]
    procs = launch([*args, f"run.dir={run_dir}"], 2, tmp_path)
    wait_for_step(run_dir, 3, procs)  # past the step-2 checkpoint, before the end
    kill_group(procs, signal.SIGKILL)
    wait_all(procs)
    assert any(r["step"] >= 3 for r in metrics(run_dir))
    assert (run_dir / "checkpoints" / "step_00000002" / "deepspeed").is_dir()
    codes = [r.returncode for r in cli_world([*args, f"run.dir={run_dir}"], 2, tmp_path)]
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "rank0.log").read_text()
    records, ref = metrics(run_dir), metrics(ref_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # no duplicates
    assert len({r["loss"] for r in ref}) == steps  # the model moves: steps differ
    assert [r["loss"] for r in records] == [r["loss"] for r in ref]  # bit-identical


def test_sigterm_saves_exits_75_and_the_rerun_continues(tmp_path):
    """One process: SIGTERM after step 4 -> checkpoint of the stop step, exit 75; the same
    command resumes there and finishes (exact resume: the SIGKILL test above)."""
    from tests.test_checkpoint import _env, metrics, stop_with

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "megadiff", "train", "examples/tiny_cpu.yaml"]
    cmd += ["train.engine=deepspeed", "train.steps=24", f"run.dir={run_dir}"]
    cmd += ["logging.progress=false"]
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen(cmd, env=_env({}), stdout=log, stderr=subprocess.STDOUT)
    code = stop_with(proc, signal.SIGTERM, run_dir, group=False)
    assert code == 75, (tmp_path / "log").read_text()[-3000:]
    stop = metrics(run_dir)[-1]["step"]
    assert stop < 24
    ckpts = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert ckpts == [f"step_{stop:08d}"]
    assert (run_dir / "checkpoints" / ckpts[0] / "manifest.json").is_file()
    (again,) = cli_world(cmd[5:], command=TINY_CPU)  # the same command, already imported
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / ckpts[0]} at step {stop}" in again.stdout
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 25))  # each step once


def test_nonfinite_skip_and_stop(tmp_path):
    """train.nonfinite through the shared loop: a NaN step leaves DeepSpeed's weights alone
    (skip) or saves the last good step and exits 3 (stop)."""
    from tests.workers import faults_run

    ds = ["train.engine=deepspeed", "train.steps=4"]
    r = run_world(
        faults_run, 1, ([*ds, "checkpoint.save_on_exit=false"], str(tmp_path / "a"), [2])
    )[0]
    snaps = r["snapshots"]
    assert r["exit_code"] == 0 and r["nonfinite_steps"] == 1
    assert all(torch.equal(snaps[1][k], snaps[2][k]) for k in snaps[1])  # NaN step: no update
    assert not all(torch.equal(snaps[2][k], snaps[3][k]) for k in snaps[2])  # then it trains
    by_step = {m["step"]: m for m in r["metrics"]}
    assert by_step[2]["nonfinite"] and by_step[2]["skipped"] and not by_step[3]["skipped"]

    r = run_world(faults_run, 1, ([*ds, "train.nonfinite=stop"], str(tmp_path / "b"), [3]))[0]
    assert r["exit_code"] == 3 and r["step"] == 2
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_00000002"]


def test_optimizer_state_of_the_other_engine_is_refused(tmp_path):
    """A megatron-core run's directory resumed with train.engine=deepspeed: a named error
    (exit 2); its weights load with checkpoint.load_optimizer=false, and the DeepSpeed run's
    checkpoint reads back as full tensors."""
    run = tmp_path / "mc"
    base = ["train.steps=2", "logging.progress=false"]
    (r,) = cli_world([*base, f"run.dir={run}"], command=TINY_CPU)
    assert r.returncode == 0, r.stderr[-2000:]
    (r,) = cli_world(
        [*base, f"run.dir={run}", "train.steps=4", "train.engine=deepspeed"], command=TINY_CPU
    )
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "megatron engine" in r.stderr and "checkpoint.load_optimizer=false" in r.stderr
    # a new DeepSpeed run from the step-2 weights trains one step (a load at or beyond
    # train.steps is refused, so the weights move by one Adam step: at most lr per element)
    (r,) = cli_world(
        [*base, f"run.dir={tmp_path / 'ds'}", "train.engine=deepspeed", "train.steps=1"]
        + [f"checkpoint.load={run}/checkpoints", "checkpoint.load_optimizer=false"]
        + ["checkpoint.reset_step=true"],
        command=TINY_CPU,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # the model reader (export, generation) reads a DeepSpeed run like a megatron-core one
    from tests.workers import read_model

    ds = run_world(read_model, 1, (str(tmp_path / "ds"),))[0]
    mc = run_world(read_model, 1, (str(run),))[0]
    assert ds["step"] == 1 and ds["params"].keys() == mc["params"].keys()
    peak_lr = 2e-3  # examples/tiny_cpu.yaml; Adam's first step moves an element by <= lr
    for k, want in mc["params"].items():
        assert (ds["params"][k] - want).abs().max() <= peak_lr * 1.001, k
    assert any(not torch.equal(ds["params"][k], mc["params"][k]) for k in mc["params"])
