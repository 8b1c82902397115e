"""``megadiff policy train`` for real (a tiny synthetic dLLM, the built-in letters task): DP=2
under torchrun equals one process, SIGTERM saves and exits 75, a SIGKILLed run resumes to the
uninterrupted result, bad input exits 2 with a named error; ``megadiff generate --strategy
policy`` with a trained and a mismatched policy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def policy_args(ckpt: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "-m", "megadiff", "policy", "train", f"policy.ckpt={ckpt}", "policy.task=letters",
        "policy.gen_length=6", "policy.group_size=4", "policy.prompts_per_step=2",
        "policy.steps=4", "policy.lr=1e-2", "policy.alpha=0", "policy.sampler_steps=12",
        "checkpoint.every=1", "checkpoint.keep=10",
        f"run.dir={run_dir}", *extra,
    ]  # fmt: skip


def run_policy(args: list[str], launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def dllm(tmp_path_factory) -> Path:
    """A tiny synthetic-data dLLM (2 training steps, byte-level text tokenizer)."""
    base = tmp_path_factory.mktemp("dllm")
    r = subprocess.run(
        [sys.executable, "-m", "megadiff", "train", str(ROOT / "examples" / "tiny_cpu.yaml"),
         "train.steps=2", f"run.dir={base / 'run'}", "logging.progress=false"],
        capture_output=True, text=True, cwd=base, env=ENV, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return base / "run"


@pytest.fixture(scope="module")
def reference_run(dllm, tmp_path_factory) -> Path:
    """One process, 4 uninterrupted steps."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    r = run_policy(policy_args(dllm, run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "policy" / "model.safetensors")


def assert_same_run(a: Path, b: Path, steps: int = 4) -> None:
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == list(range(1, steps + 1)) == [r["step"] for r in mb]
    assert any(r["updated"] for r in ma)  # some advantages were non-zero: weights moved
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["nfe"] == rb["nfe"] and ra["still_masked"] == rb["still_masked"], (ra, rb)
        for key in ("reward", "accuracy"):  # float64 sums in another order
            assert abs(ra[key] - rb[key]) <= 1e-12, (key, ra, rb)
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5, (ra, rb)
    wa, wb = weights(a, steps), weights(b, steps)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= 1e-5, k


def test_dp2_under_torchrun_equals_one_process(dllm, reference_run, tmp_path):
    r = run_policy(policy_args(dllm, tmp_path / "dp2"), TORCHRUN)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(reference_run, tmp_path / "dp2")
    line = [x for x in r.stdout.splitlines() if x.startswith("policy step 4/4")]
    assert line and "reward" in line[0] and "NFE" in line[0]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 900  # start-up alone takes minutes on a busy 2-core box
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_sigterm_saves_and_exits_75_then_sigkill_resume_reproduces(dllm, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    args = policy_args(dllm, run_dir)
    ckpts = run_dir / "checkpoints"
    proc = _start(args)
    _wait_for(ckpts / "step_00000001", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    saved = sorted(p.name for p in ckpts.glob("step_*"))
    assert saved and saved[-1] < "step_00000004"
    proc = _start(args)  # resumes; killed without warning after its next checkpoint
    nxt = int(saved[-1][5:]) + 1
    _wait_for(ckpts / f"step_{nxt:08d}", proc)
    proc.kill()
    proc.communicate(timeout=60)
    r = run_policy(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert_same_run(reference_run, run_dir)


def _cli(capsys, *argv: str) -> tuple[int, str]:
    from megadiff.cli import main

    saved = sys.argv
    try:
        code = main(list(argv))
    finally:
        sys.argv = saved
    return code, capsys.readouterr().err


def test_bad_input_exits_2_with_named_errors(dllm, reference_run, tmp_path, capsys):
    from megadiff.checkpoint_files import write_manifest

    base = [
        "policy", "train", "policy.task=letters", "policy.gen_length=6", "policy.steps=1",
        "logging.progress=false",
    ]  # fmt: skip
    # a dLLM checkpoint without tokenizers
    (src,) = (dllm / "checkpoints").glob("step_*")
    bare = tmp_path / "bare" / src.name
    shutil.copytree(src, bare)
    shutil.rmtree(bare / "tokenizers")
    write_manifest(bare, 2)
    code, err = _cli(capsys, *base, f"policy.ckpt={bare}", f"run.dir={tmp_path / 'a'}")
    assert code == 2 and "no text tokenizer" in err, err
    # a verifier that does not import
    code, err = _cli(
        capsys, *base, f"policy.ckpt={dllm}", "policy.task=no_such_module_xyz:score",
        f"run.dir={tmp_path / 'b'}",
    )  # fmt: skip
    assert code == 2 and "verifier 'no_such_module_xyz:score' does not import" in err, err
    # prompts the checkpoint cannot express (longer than its 64-token context with the buffer)
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps("x" * 70) + "\n")
    code, err = _cli(
        capsys, *base, f"policy.ckpt={dllm}", f"policy.prompts={prompts}",
        f"run.dir={tmp_path / 'c'}",
    )  # fmt: skip
    assert code == 2 and "task 'letters'" in err and "context 64" in err, err
    # resuming a run whose policy has another feature set
    run_dir = tmp_path / "d"
    shutil.copytree(reference_run, run_dir)
    code, err = _cli(
        capsys, *base, f"policy.ckpt={dllm}", "policy.steps=9", f"run.dir={run_dir}",
        "policy.features=[confidence,margin]",
    )  # fmt: skip
    assert code == 2 and "another shape or feature set" in err and "features" in err, err
    code, err = _cli(capsys, *base, f"run.dir={tmp_path / 'e'}")
    assert code == 2 and "policy.ckpt" in err, err


def test_generate_with_a_policy_and_a_mismatched_one(dllm, reference_run, tmp_path, capsys):
    common = ["generate", "--ckpt", str(dllm), "--task", "text", "--prompt", "abc:",
              "--gen-length", "6", "--no-progress"]  # fmt: skip
    code, err = _cli(capsys, *common, "--strategy", "policy", "--policy", str(reference_run),
                     "--out", str(tmp_path / "s"))  # fmt: skip
    assert code == 0, err
    row = json.loads((tmp_path / "s" / "samples.jsonl").read_text().splitlines()[0])
    assert row["settings"]["strategy"] == "policy" and 1 <= row["nfe"] <= 6
    # a folder whose weights are of another feature set than its policy.json says
    bad = tmp_path / "bad"
    shutil.copytree(reference_run / "checkpoints" / "step_00000004" / "policy", bad)
    meta = json.loads((bad / "policy.json").read_text())
    meta["config"]["features"] = ["confidence", "topk"]
    (bad / "policy.json").write_text(json.dumps(meta))
    code, err = _cli(capsys, *common, "--strategy", "policy", "--policy", str(bad))
    assert code == 2 and "does not match policy.json" in err, err
    code, err = _cli(capsys, *common, "--strategy", "policy")
    assert code == 2 and "needs --policy" in err, err
