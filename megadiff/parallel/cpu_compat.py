"""Lets megatron-core's CUDA-only code paths run unchanged on CPU (gloo).

megatron-core asks for ``device="cuda"`` / ``torch.cuda.current_device()`` buffers, calls
``torch.cuda.synchronize``, checks ``tensor.type() == "torch.cuda.FloatTensor"`` and keeps its
model-parallel RNG streams in CUDA generators. :func:`enable` answers all of these on CPU:

* a ``TorchFunctionMode`` maps CUDA device requests (``"cuda"``, ``"cuda:N"``, ``N``) to CPU,
  makes ``Tensor.cuda()`` a no-op and answers ``Tensor.type()`` with the ``torch.cuda.*`` name;
* ``torch.cuda.current_device/synchronize/current_stream/...`` get harmless CPU stand-ins;
* the CUDA RNG state accessors (torch's and megatron-core's tracker helpers) act on the CPU
  default generator, so ``get_cuda_rng_tracker().fork()`` works as on GPU.

It is active only when CUDA is unavailable, is idempotent, and lives here alone.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.int8: "torch.cuda.CharTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}

_lock = threading.Lock()
_mode: TorchFunctionMode | None = None


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement requests to CPU for every torch call made while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            t = args[0]
            return _CUDA_TYPE_NAMES.get(t.dtype, func(*args))
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        # Tensor.to's positional device (new_empty's positional args are sizes: an int there is
        # a size, not a CUDA ordinal)
        if func is torch.Tensor.to and len(args) > 1:
            args = tuple("cpu" if i > 0 and _is_cuda(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: every operation is already ordered on CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, *args: Any) -> _NullEvent:
        return _NullEvent()

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _NullEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _cpu_get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    state = torch.default_generator.get_state()
    return state.clone() if kwargs.get("clone") else state


def _cpu_set_rng_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.default_generator.set_state(state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.set_device = lambda *a, **k: None
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    cuda.manual_seed = _cpu_manual_seed
    cuda.manual_seed_all = _cpu_manual_seed
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state


def needed() -> bool:
    return not torch.cuda.is_available()


def enable() -> bool:
    """Activate the layer for this process (no-op with CUDA). Returns whether it is active."""
    global _mode
    if not needed():
        return False
    with _lock:
        if _mode is None:
            # megatron-core's optimizer zero_grad() touches .grad of its shard views; on GPU
            # that warning is attributed to megatron-core, here to this module's dispatch.
            warnings.filterwarnings(
                "ignore",
                message=r"The \.grad attribute of a Tensor that is not a leaf",
                module=__name__,
            )
            # megatron-core's advice for CUDA streams (TP's async gradient all-reduce)
            warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS")
            _patch_torch_cuda()
            _patch_megatron()
            _mode = CudaToCpuMode()
            _mode.__enter__()
    return True


def is_enabled() -> bool:
    return _mode is not None


def disable() -> None:
    """Leave the ``TorchFunctionMode`` (every torch call pays for it while active), e.g. once a
    checkpoint has been read into plain-PyTorch modules. The ``torch.cuda`` stand-ins stay."""
    global _mode
    with _lock:
        if _mode is not None:
            _mode.__exit__(None, None, None)
            _mode = None
