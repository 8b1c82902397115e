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


STEPS = 5
SM89 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="FP8 GEMMs need compute capability 8.9+",
)


def _losses(precision: str, tmp_path, *overrides: str) -> list[float]:
    args = ([f"train.precision={precision}", *overrides], STEPS, str(tmp_path / precision))
    losses = run_world(train_capture, 1, args)[0]["losses"]
    assert all(math.isfinite(x) for x in losses), losses
    return losses


def _assert_close(ours: list[float], ref: list[float], rtol: float) -> None:
    diffs = [abs(a - b) / b for a, b in zip(ours, ref, strict=True)]
    assert max(diffs) <= rtol, f"{ours} vs {ref}"
    assert max(diffs) > 0, "identical losses: the lower precision was not applied"


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory):
    return _losses("fp32", tmp_path_factory.mktemp("fp32"))


def test_bf16_training_follows_fp32(fp32_losses, tmp_path):
    _assert_close(_losses("bf16", tmp_path), fp32_losses, 0.02)


@SM89
def test_local_fp8_training_follows_fp32(fp32_losses, tmp_path):
    ours = _losses("fp8", tmp_path, "model.transformer_impl=local")
    _assert_close(ours, fp32_losses, 0.03)


@SM89
def test_scaled_mm_matches_the_cpu_path_on_the_same_fp8_operands():
    from megadiff.model.fp8 import E4M3, E5M2, gemm, quantize, scale_cast

    gen = torch.Generator().manual_seed(0)
    a_cpu = torch.randn(256, 512, generator=gen)
    b_cpu = torch.randn(384, 512, generator=gen) * 0.02
    for a_dtype in (E4M3, E5M2):
        a, b = quantize(a_cpu.cuda(), a_dtype), quantize(b_cpu.cuda(), E4M3)
        eager = scale_cast(a_cpu.cuda(), 1 / a.scale_inv, torch.finfo(a_dtype).max, a_dtype)
        assert torch.equal(a.data.view(torch.uint8), eager.view(torch.uint8))  # fused = eager
        ours = gemm(a, b, torch.float32).cpu()
        a.data, b.data = a.data.cpu(), b.data.cpu()
        a.scale_inv, b.scale_inv = a.scale_inv.cpu(), b.scale_inv.cpu()
        ref = gemm(a, b, torch.float32)
        assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_cpu_layer_stays_off_with_cuda():
    from megadiff.parallel import cpu_compat

    assert not cpu_compat.enable()
    assert torch.zeros(1, device="cuda").is_cuda


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None, reason="needs Transformer Engine"
)
def test_fp8_training_with_transformer_engine(fp32_losses, tmp_path):
    ours = _losses("fp8", tmp_path, "model.transformer_impl=transformer_engine")
    _assert_close(ours, fp32_losses, 0.03)
