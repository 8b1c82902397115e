"""Core attention for the local (non-Transformer-Engine) spec: torch's fused SDPA.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward
signature, inputs ``[s, b, heads, head_dim]``, output ``[s, b, heads * head_dim]``) that calls
``F.scaled_dot_product_attention``: one fused kernel instead of baddbmm + softmax + bmm, and
flash/memory-efficient kernels on GPUs without Transformer Engine. Bidirectional; an optional
padding mask ``[b, 1, 1, keys]`` (True = masked key).

Block KV cache (semi-autoregressive sampling, :mod:`megadiff.diffusion.block_cache`): with a
:class:`LayerKV` in ``kv`` the module keeps this forward's keys and values (after megatron's
QK-norm and RoPE, this rank's query groups), or attends a span of queries to the cached
keys/values with the span's own written over them. Everything else in the layer is megatron's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from torch import Tensor


@dataclass
class LayerKV:
    """One layer's block KV cache. ``past``: ``[b, 2, groups, s + 1, head_dim]`` (keys, values;
    the last slot is scratch, where a span's padding slots write, never attended to), the
    layout of :mod:`megadiff.hf.network_megadiff`'s cache. ``span`` None: the forward runs the
    whole buffer and fills ``past``. Otherwise ``span`` ``[b, n]`` is the buffer position of each
    query (``s`` for padding slots): their keys/values are written into ``past`` there and the
    queries attend to all of it."""

    past: Tensor | None = None
    span: Tensor | None = None

    def keys_values(self, key: Tensor, value: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The keys/values ``[keys, b, groups, head_dim]`` to attend to, from this forward's
        ``[n, b, groups, head_dim]``; ``mask`` ``[b, 1, 1, keys]`` covers the scratch slot
        when it is one of them."""
        k, v = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)  # [b, groups, n, d]
        if self.span is None:
            b, g, s, d = k.shape
            self.past = k.new_zeros(b, 2, g, s + 1, d)
            self.past[:, 0, :, :s], self.past[:, 1, :, :s] = k, v
            return key, value
        at = self.span[:, None, :, None].expand_as(k)
        self.past[:, 0].scatter_(2, at, k)
        self.past[:, 1].scatter_(2, at, v)
        n_keys = self.past.shape[3]
        if mask is None or mask.shape[-1] < n_keys:  # the scratch slot is not among the keys
            n_keys -= 1
        k, v = (self.past[:, i, :, :n_keys].permute(2, 0, 1, 3) for i in (0, 1))
        return k, v


class SDPAttention(DotProductAttention):
    """megatron-core ``DotProductAttention`` with the math replaced by torch SDPA."""

    kv: LayerKV | None = None  # the block KV cache of the running forward, if any

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type=None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        assert packed_seq_params is None and attention_bias is None
        if self.kv is not None:
            key, value = self.kv.keys_values(key, value, attention_mask)
        sq, b, heads, _ = query.shape
        groups = key.shape[2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        if heads != groups:
            k = k.repeat_interleave(heads // groups, dim=1)
            v = v.repeat_interleave(heads // groups, dim=1)
        mask = None if attention_mask is None else ~attention_mask  # SDPA: True = attend
        p = self.config.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, scale=self.softmax_scale
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
