"""The CPU compatibility layer answers megatron-core's CUDA requests on CPU."""

from __future__ import annotations

import pytest
import torch

from megadiff.parallel import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="layer is CPU-only")


@pytest.fixture(scope="module", autouse=True)
def enabled():
    assert cpu_compat.enable()
    assert cpu_compat.is_enabled()


def test_cuda_device_requests_map_to_cpu():
    for dev in ("cuda", "cuda:0", torch.device("cuda"), 0, torch.cuda.current_device()):
        t = torch.zeros(3, device=dev)
        assert t.device.type == "cpu"
    assert torch.empty(2, device="cuda").device.type == "cpu"
    x = torch.ones(2)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert torch.tensor([1.0], device="cuda").item() == 1.0
    # integer sizes are sizes, not CUDA ordinals
    assert x.new_empty(3, 4, 5).shape == (3, 4, 5)
    assert x.new_empty((2, 3), device="cuda").shape == (2, 3)
    assert x.to(0).device.type == "cpu"


def test_type_answers_cuda_names_and_conversion_still_works():
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64


def test_cuda_stubs():
    torch.cuda.synchronize()
    s = torch.cuda.current_stream()
    s.wait_stream(torch.cuda.default_stream())
    torch.cuda.Event().record()
    assert torch.cuda.current_device() == 0
    assert not torch.cuda.is_available()  # the layer must not pretend a GPU exists


def test_megatron_rng_tracker_forks_on_cpu():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("test-stream", 1234)
    torch.manual_seed(0)
    with tracker.fork("test-stream"):
        a = torch.rand(4)
    outside = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(outside, torch.rand(4))  # the default stream was restored untouched
    tracker.reset()
    tracker.add("test-stream", 1234)
    with tracker.fork("test-stream"):
        b = torch.rand(4)
    assert torch.equal(a, b)  # the forked stream is reproducible from its seed
    tracker.reset()


def test_global_memory_buffer_is_cpu():
    from megatron.core.utils import GlobalMemoryBuffer

    buf = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x")
    assert buf.shape == (2, 3) and buf.device.type == "cpu"


def test_enable_is_idempotent():
    assert cpu_compat.enable() and cpu_compat.enable()
    assert torch.zeros(1, device="cuda").device.type == "cpu"
