"""The GPU check's pieces on CPU: bench_mfu's bare twin runs the same training as megadiff, its
summary table, and gpu_check.sh's refusals (the whole script: ``--cpu-dry``, docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=128",
    "model.seq_length=32",
    "train.micro_batch=2",
    "train.global_batch=4",
]


def test_bench_mfu_twin_trains_the_same_run_and_summarises(tmp_path):
    out = tmp_path / "results.jsonl"
    r = subprocess.run(
        [sys.executable, "tools/bench_mfu.py", "examples/tiny_cpu.yaml", "--steps", "2",
         "--warmup", "1", "--twin", "--out", str(out), *SMALL],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads(out.read_text())
    assert line["overrides"] == SMALL and line["tokens_per_step"] == 4 * 32
    # same weights, batches and masking noise: the twin's loss after 3 steps is megadiff's
    # (fp32; the two differ only in summation order)
    assert abs(line["twin"]["final_loss"] - line["final_loss"]) < 1e-3 * line["final_loss"]
    assert line["twin"]["tokens_per_s"] > 0 and "twin_compiled" not in line
    table = subprocess.run(
        [sys.executable, "tools/bench_mfu.py", "--summary", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    ).stdout.splitlines()  # fmt: skip
    assert table[0].startswith("| config |") and len(table) == 3
    assert table[2].startswith("| tiny_cpu.yaml | model.num_layers=2")
    assert "| fp32 (local) |" in table[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU box")
def test_gpu_check_refuses_a_cpu_box_without_cpu_dry(tmp_path):
    r = subprocess.run(
        ["bash", "tools/gpu_check.sh", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "no CUDA GPU here" in r.stderr and "--cpu-dry" in r.stderr
    assert not (tmp_path / "o").exists()  # refused before writing anything


def test_gpu_check_names_an_unknown_option():
    r = subprocess.run(
        ["bash", "tools/gpu_check.sh", "--fast"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2 and "unknown option '--fast'" in r.stderr
