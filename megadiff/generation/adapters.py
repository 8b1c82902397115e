"""``logits_fn(tokens [B, L]) -> logits [B, L, V]`` for the sampler, from either model.

PAD tokens are masked out of attention (as in training); logits past the real vocabulary are
dropped. Both functions also take ``positions`` ``[B, P]`` and ``columns`` ``(lo, hi)`` and then
return only those logits ``[B, P, hi - lo]`` (see :data:`megadiff.diffusion.sampling.LogitsFn`);
the models compute their output layer only at those positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from megadiff.diffusion.block_cache import CacheCall


def _column_range(columns: tuple[int, int] | None, vocab_size: int) -> tuple[int, int]:
    """``columns`` checked against the real vocabulary (``None``: all of it)."""
    lo, hi = (0, vocab_size) if columns is None else columns
    if not 0 <= lo < hi <= vocab_size:
        raise ValueError(f"columns {columns} outside the vocabulary [0, {vocab_size})")
    return lo, hi


def reference_logits_fn(model: torch.nn.Module, pad_id: int, vocab_size: int) -> Callable:
    """The plain-PyTorch :class:`~megadiff.model.reference.ReferenceModel` (with the block KV
    cache: ``cache``, a :class:`~megadiff.diffusion.block_cache.CacheCall`)."""
    from megadiff.hf.network_megadiff import span_positions

    model.eval()

    @torch.no_grad()
    def fn(
        tokens: Tensor,
        positions: Tensor | None = None,
        columns: tuple[int, int] | None = None,
        cache: CacheCall | None = None,
    ) -> Tensor:
        pad = tokens == pad_id
        key_pad = pad if bool(pad.any()) else None
        cols = _column_range(columns, vocab_size)
        if cache is None:
            return model(tokens, key_pad, positions, cols)
        if cache.past is None:  # a full forward that keeps its keys/values
            cache.past = []
            return model(tokens, key_pad, positions, cols, kv_out=cache.past)
        span = span_positions(cache.start, cache.length, tokens.shape[1])
        at = None  # the span's slots (a sampler's padding candidates: any slot)
        if positions is not None:
            at = (positions - cache.start[:, None]).clamp(0, span.shape[1] - 1)
        return model(tokens, key_pad, at, cols, past=cache.past, span=span)

    return fn


def megatron_logits_fn(model, pad_id: int, vocab_size: int) -> Callable:
    """A megatron-core :class:`~megadiff.model.model.MaskedDiffusionModel` at any TP size (with
    the block KV cache: ``cache``, a :class:`~megadiff.diffusion.block_cache.CacheCall`).

    Every TP rank calls it with the same tokens; the vocab-parallel logits ``[s, b, V/tp]`` are
    all-gathered over the TP group. Pipeline parallelism is not supported here. The cache runs
    megatron's own layers, with each layer's core attention keeping (and, in a span forward,
    reading) this rank's keys and values (:class:`~megadiff.model.attention.LayerKV`); it needs
    the local layers (``model.transformer_impl=local``) without sequence parallelism.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megadiff.hf.network_megadiff import span_positions
    from megadiff.model.attention import LayerKV, SDPAttention
    from megadiff.model.gather import unwrap

    chunks = model if isinstance(model, list) else [model]
    if len(chunks) != 1 or ps.get_pipeline_model_parallel_world_size() > 1:
        raise RuntimeError("generation needs pipeline_parallel=1 (one model chunk per rank)")
    inner = unwrap(chunks[0]).eval()
    dev = next(inner.parameters()).device
    sp = bool(getattr(inner.config, "sequence_parallel", False))
    cores = [layer.self_attention.core_attention for layer in inner.decoder.layers]

    def run(tokens: Tensor, mask: Tensor | None, at: Tensor | None, **kw) -> Tensor:
        """The model's gathered logits ``[b, s or p, V]``; ``kw``: ``rotary_positions``."""
        shard = inner(tokens.to(dev), mask, None if sp else at, **kw)  # [s or p, b, V/tp]
        full = gather_from_tensor_model_parallel_region(shard).transpose(0, 1)
        if at is not None and sp:  # sequence parallel: every position, picked here
            full = full.gather(1, at.to(dev)[..., None].expand(-1, -1, full.shape[-1]))
        return full

    def run_cached(tokens: Tensor, mask: Tensor | None, at: Tensor | None, kvs, **kw) -> Tensor:
        """:func:`run` with the layers' core attention using ``kvs`` (one per layer)."""
        if sp or not all(isinstance(c, SDPAttention) for c in cores):
            raise ValueError(
                "the block KV cache in the megatron-core model needs its local layers "
                "(model.transformer_impl=local) without parallel.sequence_parallel; use cache "
                "'none' here, or sample the checkpoint with megadiff generate"
            )
        for core, kv in zip(cores, kvs):
            core.kv = kv
        try:
            return run(tokens, mask, at, **kw)
        finally:
            for core in cores:
                core.kv = None

    @torch.no_grad()
    def fn(
        tokens: Tensor,
        positions: Tensor | None = None,
        columns: tuple[int, int] | None = None,
        cache: CacheCall | None = None,
    ) -> Tensor:
        pad = tokens == pad_id
        lo, hi = _column_range(columns, vocab_size)
        if cache is None or cache.past is None:
            mask = pad[:, None, None, :].to(dev) if bool(pad.any()) else None
            if cache is None:
                return run(tokens, mask, positions)[..., lo:hi].float()
            kvs = [LayerKV() for _ in cores]  # a full forward that keeps its keys/values
            out = run_cached(tokens, mask, positions, kvs)
            cache.past = [kv.past for kv in kvs]
            return out[..., lo:hi].float()
        s = tokens.shape[1]
        span = span_positions(cache.start, cache.length, s)
        if bool((span >= s).any()):  # padding slots write to the scratch slot: never a key
            pad = torch.cat([pad, pad.new_ones(len(pad), 1)], 1)
        mask = pad[:, None, None, :].to(dev) if bool(pad.any()) else None
        at = None  # the span's slots (a sampler's padding candidates: any slot)
        if positions is not None:
            at = (positions - cache.start[:, None]).clamp(0, span.shape[1] - 1)
        inside = span.clamp(max=s - 1)
        kvs = [LayerKV(p, span.to(dev)) for p in cache.past]
        out = run_cached(tokens.gather(1, inside), mask, at, kvs, rotary_positions=inside)
        return out[..., lo:hi].float()

    return fn
