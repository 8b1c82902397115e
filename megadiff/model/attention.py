"""Core attention for the local (non-Transformer-Engine) spec: torch's fused SDPA.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward
signature, inputs ``[s, b, heads, head_dim]``, output ``[s, b, heads * head_dim]``) that calls
``F.scaled_dot_product_attention``: one fused kernel instead of baddbmm + softmax + bmm, and
flash/memory-efficient kernels on GPUs without Transformer Engine. Bidirectional; an optional
padding mask ``[b, 1, 1, s]`` (True = masked key).
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from torch import Tensor


class SDPAttention(DotProductAttention):
    """megatron-core ``DotProductAttention`` with the math replaced by torch SDPA."""

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
