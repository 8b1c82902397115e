"""Benchmark tools' arithmetic, checked against independent counts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from megadiff.config import load_config, validate
from megadiff.model.reference import ReferenceConfig, ReferenceModel

ROOT = Path(__file__).parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flops_per_token_counts_every_matmul_weight():
    bench = _tool("bench_mfu")
    cfg = validate(load_config(None, ["model.num_query_groups=2", "model.num_layers=3"]), 1)
    model = ReferenceModel(ReferenceConfig.from_model_config(cfg.model))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    m = cfg.model
    attention = 12 * m.num_layers * m.hidden_size * m.seq_length
    assert bench.flops_per_token(cfg) == 6 * linear + attention
