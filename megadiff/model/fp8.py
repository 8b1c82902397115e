"""FP8 matmuls for the local spec's parallel linears (``train.precision=fp8`` without
Transformer Engine).

Recipe (what Transformer Engine calls hybrid formats with per-tensor current scaling):
activations and weights are cast to e4m3 for the forward GEMM, output gradients to e5m2 for the
two backward GEMMs (dgrad e5m2 x e4m3 weights, wgrad e5m2 x e4m3 activations). Each tensor is
scaled by ``max(format) / amax(tensor)`` just before its cast. Parameters, gradients and the
optimizer stay as they are for bf16 (GPU) or fp32 (CPU); only the GEMM operands are FP8, and the
saved activations are kept in FP8 for backward.

Tensor parallel: the amax of a TP-sharded operand (weights, a row-parallel layer's input, a
column-parallel layer's output gradient) is reduced (max) over the TP group, so every rank
scales with the scale a single process would use and a TP run quantises exactly as TP=1 does.

On CUDA the GEMMs are ``torch._scaled_mm`` (Ada/Hopper and later) and each cast is one fused
kernel (``torch.compile``). Elsewhere (CPU: torch's
float8 GEMM is about 1000x slower than fp32 there) the same FP8 operands are dequantised and
multiplied in fp32: the same products, accumulated in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

E4M3 = torch.float8_e4m3fn  # forward operands: 3 mantissa bits, max 448
E5M2 = torch.float8_e5m2  # output gradients: 2 mantissa bits, max 57344
GEMM_MULTIPLE = 16  # torch._scaled_mm's inner and output dimensions must divide by this


@dataclass
class Fp8Tensor:
    """``data * scale_inv`` approximates the original (per-tensor scale)."""

    data: torch.Tensor
    scale_inv: torch.Tensor  # fp32 scalar

    def t(self) -> Fp8Tensor:
        return Fp8Tensor(self.data.t().contiguous(), self.scale_inv)

    def dequantize(self) -> torch.Tensor:
        return self.data.float() * self.scale_inv


def quantize(t: torch.Tensor, dtype: torch.dtype, group: dist.ProcessGroup | None = None):
    """Current scaling: ``t * max(dtype) / amax(t)`` cast to ``dtype`` (saturating; scale 1 for
    an all-zero tensor); ``group``: reduce the amax over it first (a tensor sharded across it)."""
    amax = t.detach().abs().amax().float()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    fmax = torch.finfo(dtype).max
    scale = torch.where(amax > 0, fmax / amax, 1.0).clamp(max=torch.finfo(torch.float32).max)
    cast = _fused_scale_cast() if t.is_cuda else scale_cast
    return Fp8Tensor(cast(t, scale, fmax, dtype), scale.reciprocal())


def scale_cast(t: torch.Tensor, scale: torch.Tensor, fmax: float, dtype: torch.dtype):
    """``t * scale`` saturated to +-``fmax`` and cast to ``dtype``."""
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype)


_FUSED: list = []


def _fused_scale_cast():
    """:func:`scale_cast` as one fused kernel (torch.compile, dynamic shapes), built once."""
    if not _FUSED:
        _FUSED.append(torch.compile(scale_cast, dynamic=True))
    return _FUSED[0]


def gemm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b.T`` for row-major ``a`` [M, K] and ``b`` [N, K], scaled back to real values."""
    if a.data.is_cuda:
        return torch._scaled_mm(
            a.data, b.data.t(), scale_a=a.scale_inv, scale_b=b.scale_inv, out_dtype=out_dtype
        )
    return (a.dequantize() @ b.dequantize().t()).to(out_dtype)


class _Fp8Matmul(torch.autograd.Function):
    """``x @ weight.T`` with FP8 operands in all three GEMMs (no communication here)."""

    @staticmethod
    def forward(ctx, x, weight, group, input_sharded: bool, grad_sharded: bool):
        lead = x.shape[:-1]
        xq = quantize(x.reshape(-1, x.shape[-1]), E4M3, group if input_sharded else None)
        wq = quantize(weight, E4M3, group)
        ctx.save_for_backward(xq.data, xq.scale_inv, wq.data, wq.scale_inv)
        ctx.group, ctx.grad_sharded, ctx.lead = group, grad_sharded, lead
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return gemm(xq, wq, x.dtype).view(*lead, -1)

    @staticmethod
    def backward(ctx, grad):
        x_data, x_sinv, w_data, w_sinv = ctx.saved_tensors
        xq, wq = Fp8Tensor(x_data, x_sinv), Fp8Tensor(w_data, w_sinv)
        g = grad.reshape(-1, grad.shape[-1])
        gq = quantize(g, E5M2, ctx.group if ctx.grad_sharded else None)
        grad_x = gemm(gq, wq.t(), ctx.x_dtype).view(*ctx.lead, -1)
        grad_w = gemm(gq.t(), xq.t(), ctx.w_dtype)
        return grad_x, grad_w, None, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group: dist.ProcessGroup,
    column: bool,
    allreduce_dgrad: bool = False,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """A parallel linear's local GEMM in FP8, with megatron-core's own TP communication around
    it: sequence-parallel all-gather (backward: reduce-scatter) or the dgrad all-reduce."""
    if sequence_parallel:
        x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)
    elif allreduce_dgrad:
        x = copy_to_tensor_model_parallel_region(x, group=group)
    out = _Fp8Matmul.apply(x, weight, group, not column, column)
    return out if bias is None else out + bias


class Fp8ColumnParallelLinear(ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear with its GEMMs in FP8 (same parameters)."""

    def _forward_impl(self, input, weight, bias, allreduce_dgrad, sequence_parallel, **kwargs):
        return fp8_linear(
            input, weight, bias, self.tp_group, True, allreduce_dgrad, sequence_parallel
        )


class Fp8RowParallelLinear(RowParallelLinear):
    """megatron-core's RowParallelLinear with its GEMM in FP8 (same parameters)."""

    def _forward_impl(self, input, weight, bias, **kwargs):
        return fp8_linear(input, weight, bias, self.tp_group, False)
