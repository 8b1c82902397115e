"""``logits_fn(tokens [B, L]) -> logits [B, L, V]`` for the sampler, from either model.

PAD tokens are masked out of attention (as in training); logits past the real vocabulary are
dropped. The plain-PyTorch model's function also takes ``positions`` ``[B, P]`` and ``columns``
``(lo, hi)`` and then returns only those logits ``[B, P, hi - lo]`` (see
:data:`megadiff.diffusion.sampling.LogitsFn`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def reference_logits_fn(model: torch.nn.Module, pad_id: int, vocab_size: int) -> Callable:
    """The plain-PyTorch :class:`~megadiff.model.reference.ReferenceModel`."""
    model.eval()

    @torch.no_grad()
    def fn(
        tokens: Tensor, positions: Tensor | None = None, columns: tuple[int, int] | None = None
    ) -> Tensor:
        pad = tokens == pad_id
        key_pad = pad if bool(pad.any()) else None
        if columns is None:
            columns = (0, vocab_size)
        elif not 0 <= columns[0] < columns[1] <= vocab_size:
            raise ValueError(f"columns {columns} outside the vocabulary [0, {vocab_size})")
        return model(tokens, key_pad, positions, columns)

    return fn


def megatron_logits_fn(model, pad_id: int, vocab_size: int) -> Callable:
    """A megatron-core :class:`~megadiff.model.model.MaskedDiffusionModel` at any TP size.

    Every TP rank calls it with the same tokens; the vocab-parallel logits ``[s, b, V/tp]`` are
    all-gathered over the TP group. Pipeline parallelism is not supported here.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megadiff.model.gather import unwrap

    chunks = model if isinstance(model, list) else [model]
    if len(chunks) != 1 or ps.get_pipeline_model_parallel_world_size() > 1:
        raise RuntimeError("generation needs pipeline_parallel=1 (one model chunk per rank)")
    inner = unwrap(chunks[0]).eval()
    dev = next(inner.parameters()).device

    @torch.no_grad()
    def fn(tokens: Tensor) -> Tensor:
        pad = tokens == pad_id
        mask = pad[:, None, None, :].to(dev) if bool(pad.any()) else None
        shard = inner(tokens.to(dev), mask)  # [s, b, V/tp]
        full = gather_from_tensor_model_parallel_region(shard)
        return full.transpose(0, 1)[..., :vocab_size].float()

    return fn
