"""GPU-only checks (marker ``gpu``): skipped cleanly on CPU boxes."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from megadiff.parallel.launch import run_world
from tests.workers import train_capture

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_bf16_training_on_one_gpu(tmp_path):
    out = run_world(train_capture, 1, (["train.precision=bf16"], 3, str(tmp_path)))[0]
    assert all(math.isfinite(x) for x in out["losses"])


def test_cpu_layer_stays_off_with_cuda():
    from megadiff.parallel import cpu_compat

    assert not cpu_compat.enable()
    assert torch.zeros(1, device="cuda").is_cuda


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None, reason="needs Transformer Engine"
)
def test_fp8_training_with_transformer_engine(tmp_path):
    overrides = ["train.precision=fp8", "model.transformer_impl=transformer_engine"]
    out = run_world(train_capture, 1, (overrides, 3, str(tmp_path)))[0]
    assert all(math.isfinite(x) for x in out["losses"])
