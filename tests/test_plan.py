"""``megadiff plan`` and ``megadiff train --dry-run``: parameter counts against megatron-core
models built per pipeline stage (fake process group, meta device), the FLOPs formula by hand,
memory against measured CPU peaks, warnings and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megadiff.cli import main
from megadiff.config import load_config
from megadiff.machine import GIB, estimate_memory, parameters_per_rank
from megadiff.plan import resolve
from megadiff.study.costs import parameter_counts
from megadiff.training.dry_run import build_stages

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_3B = [str(ROOT / "examples" / "3b_trimodal.yaml"), "model.vocab_size=102400"]
SMALL = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4"]


@pytest.mark.parametrize(
    "overrides, world",
    [
        (["model.num_query_groups=2", "model.qk_layernorm=true"], 1),  # GQA + QK-norm
        (["model.vocab_size=500", "parallel.tensor_parallel=2"], 2),  # 500 -> 512 rows, TP
        (["parallel.pipeline_parallel=2", "model.normalization=LayerNorm"], 2),
        (["parallel.pipeline_parallel=4", "parallel.tensor_parallel=2", "model.vocab_size=1000",
          "model.vocab_pad_multiple=128", "model.num_query_groups=2", "model.qk_layernorm=true",
          "parallel.virtual_pipeline=1"], 16),
        (["model.num_layers=8", "parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2",
          "train.global_batch=16"], 4),
    ],
)  # fmt: skip
def test_plan_parameters_equal_the_built_model(overrides, world):
    plan = resolve(load_config(None, [*SMALL, *overrides]), world)
    stages = build_stages(plan, world)
    planned = parameter_counts(plan.cfg.model, plan.cfg.parallel.pipeline_parallel)
    assert [s.params_stage for s in stages] == list(planned.per_stage)
    assert sum(s.params_stage for s in stages) == planned.total
    assert max(s.params_rank for s in stages) == parameters_per_rank(plan.cfg)


def test_parameter_count_by_hand():
    """4 layers, h 64, GQA 2 of 4 heads (head dim 16), QK-norm, ffn 192 (8/3 x 64 -> 192),
    vocabulary 500 padded to 512: QKV 64 x (64 + 2 x 32), projection 64 x 64, SwiGLU
    3 x 64 x 192, RMSNorm weights 2 x 64 + 2 x 16 per layer, the final norm, 2 x 512 x 64."""
    cfg = resolve(
        load_config(
            None, [*SMALL, "model.num_query_groups=2", "model.qk_layernorm=true",
                   "model.vocab_size=500"]
        )
    ).cfg  # fmt: skip
    layer = 64 * 128 + 64 * 64 + 3 * 64 * 192 + 2 * 64 + 2 * 16
    counts = parameter_counts(cfg.model)
    assert counts.non_embedding == 4 * layer + 64
    assert counts.embedding == 2 * 512 * 64
    assert counts.total == 4 * layer + 64 + 2 * 512 * 64


# measured peak RSS (GiB) of 2-step fp32 CPU runs, docs/benchmarks.md ("Memory estimate")
MEASURED = [
    ([], 1, 0.404),
    (["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4",
      "model.seq_length=512", "train.micro_batch=8", "train.global_batch=8"], 0, 1.12),
    (["model.num_layers=2", "model.hidden_size=1024", "model.num_attention_heads=16",
      "model.seq_length=256", "train.micro_batch=16", "train.global_batch=16"], 0, 2.14),
    (["model.num_layers=6", "model.hidden_size=384", "model.num_attention_heads=6",
      "model.seq_length=512", "train.micro_batch=8", "train.global_batch=8",
      "model.recompute=full"], 0, 1.04),
    (["model.num_layers=8", "model.hidden_size=512", "model.num_attention_heads=8",
      "model.seq_length=1024", "train.micro_batch=8", "train.global_batch=8"], 0, 5.82),
    (["model.num_layers=8", "model.hidden_size=512", "model.num_attention_heads=8",
      "model.seq_length=1024", "train.micro_batch=8", "train.global_batch=8",
      "model.recompute=full", "model.recompute_method=block",
      "model.recompute_num_layers=4"], 0, 3.48),
]  # fmt: skip
TINY_BASE = ["model.num_layers=1", "model.seq_length=64", "train.micro_batch=1",
             "train.global_batch=1"]  # fmt: skip


@pytest.mark.parametrize("overrides, tiny, measured", MEASURED)
def test_memory_estimate_within_15_percent_of_measured_cpu_peaks(overrides, tiny, measured):
    cfg = resolve(load_config(None, [*(TINY_BASE if tiny else []), *overrides])).cfg
    estimate = estimate_memory(cfg, on_gpu=False).total / GIB
    assert abs(estimate / measured - 1) < 0.15, (estimate, measured)


def plan_json(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_of_the_3b_example(capsys):
    d = plan_json(capsys, *EXAMPLE_3B, "--world-size", "256", "--gpu", "h100", "--mfu", "0.4")
    # 28 layers, h 3072, 24 heads in 8 groups (head dim 128), ffn 8192, QK-norm, RMSNorm
    layer = 3072 * (3072 + 2 * 1024) + 3072 * 3072 + 3 * 3072 * 8192 + 2 * 3072 + 2 * 128
    n = 28 * layer + 3072
    assert d["params"]["non_embedding"] == n
    assert d["params"]["total"] == n + 2 * 102400 * 3072
    norms = 28 * (2 * 3072 + 2 * 128) + 3072  # no matmul
    fpt = 6 * (n - norms + 102400 * 3072) + 12 * 28 * 4096 * 3072
    assert d["flops_per_token"] == fpt
    assert d["tokens"] == 1525879 * 1024 * 4096 and d["layout"] == {"tp": 2, "pp": 1, "dp": 128}
    hours = fpt * d["tokens"] / (256 * 989e12 * 0.4) * 256 / 3600
    assert d["gpu_hours"] == pytest.approx(hours, rel=1e-9)
    mem = d["memory"]
    assert mem["optimizer_not_distributed"] == 128 * mem["optimizer_distributed"]
    assert mem["activations_per_micro_batch"]["full"] < mem["activations_per_micro_batch"]["none"]
    assert mem["total"] < d["gpu_memory"] and not d["warnings"]


def test_plan_warns_when_a_rank_does_not_fit_and_above_the_critical_batch(capsys):
    d = plan_json(
        capsys,
        *EXAMPLE_3B,
        "train.micro_batch=16",
        "train.global_batch=2048",
        "optim.logical.s_crit=1e7",
        "--world-size",
        "256",
        "--gpu",
        "a100",
    )
    assert d["memory"]["total"] > d["gpu_memory"]
    assert any("but a a100 has" in w for w in d["warnings"]), d["warnings"]
    assert any("critical batch" in w for w in d["warnings"]), d["warnings"]
    # B_crit = D / (L s_crit) with D = steps x 2048 x 4096
    assert d["critical_batch"] == pytest.approx(1525879 * 2048 / 1e7, rel=1e-9)


def test_plan_pipeline_stages_and_in_flight_micro_batches(capsys):
    d = plan_json(
        capsys, *SMALL, "model.vocab_size=512", "parallel.pipeline_parallel=2",
        "train.global_batch=32", "--world-size", "2",
    )  # fmt: skip
    # 1F1B: the first stage holds PP = 2 micro-batches (8 per step on one DP rank)
    assert d["memory"]["micro_batches_in_flight"] == 2 and d["micro_batches_per_step"] == 8
    assert len(d["params"]["per_stage"]) == 2


def test_plan_without_the_data_needs_the_vocabulary(capsys):
    assert main(["plan", str(ROOT / "examples" / "3b_trimodal.yaml")]) == 2
    err = capsys.readouterr().err
    assert "data.streams" in err and "model.vocab_size=N" in err


def test_dry_run_of_the_3b_example_at_256_ranks():
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "megadiff", "train", *EXAMPLE_3B, "--dry-run"]
    r = subprocess.run(
        [*command, "--world-size", "256"], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TP 2 x PP 1 x DP 128" in r.stdout
    assert "3,447,900,160 parameters (= plan 3,447,900,160)" in r.stdout, r.stdout
    assert "text: share 0.600, 5 rows per DP rank per step" in r.stdout
