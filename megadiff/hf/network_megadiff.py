"""The network of a megadiff model in plain PyTorch (self-contained: imports torch only).

One definition serves two places: megadiff's single-device twin of the megatron-core model
(``megadiff.model.reference``: the architecture check, generation, the bare-PyTorch baseline)
and the Hugging Face modeling code of an exported model (copied next to the weights with
``modeling_megadiff.py``, which imports it).

Parameter names and layouts equal megadiff's full (unsharded) tensors: pre-norm transformer,
**bidirectional** attention (padding-only mask), RoPE rotating halves (non-interleaved),
optional QK-norm, GQA, SwiGLU; ``linear_qkv`` rows are grouped per query group as
``[q_1..q_{h/g}, k, v]`` (each ``head_dim`` rows), ``linear_fc1`` is ``[gate; up]``. Embedding
and output keep the padded vocabulary rows; logit columns ``>= vocab_size`` are -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Arch:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int  # real vocabulary; logits past it are -inf
    padded_vocab_size: int
    qk_layernorm: bool = False
    rotary_base: float = 10000
    norm_epsilon: float = 1e-5
    normalization: str = "RMSNorm"
    residual_scale: float = 1.0  # CompleteP: residual branches scaled by depth^-alpha


def _norm(arch: Arch, dim: int) -> nn.Module:
    if arch.normalization == "RMSNorm":
        return nn.RMSNorm(dim, eps=arch.norm_epsilon)
    return nn.LayerNorm(dim, eps=arch.norm_epsilon)


def rope_cos_sin(seq_len: int, head_dim: int, base: float, device=None) -> tuple[Tensor, Tensor]:
    inv = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    )
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv)
    emb = torch.cat([freqs, freqs], dim=-1)  # [s, d]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [b, heads, s, d]; rotates halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.arch = arch
        self.head_dim = arch.hidden_size // arch.num_attention_heads
        rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * self.head_dim
        self.linear_qkv = nn.Linear(arch.hidden_size, rows, bias=False)
        self.linear_proj = nn.Linear(
            arch.num_attention_heads * self.head_dim, arch.hidden_size, bias=False
        )
        if arch.qk_layernorm:
            self.q_layernorm = _norm(arch, self.head_dim)
            self.k_layernorm = _norm(arch, self.head_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Tensor | None) -> Tensor:
        """``attend``: ``[b, 1, 1, s]`` bool, True = this key may be attended to (or None)."""
        b, s, _ = x.shape
        g, d = self.arch.num_query_groups, self.head_dim
        per = self.arch.num_attention_heads // g
        qkv = self.linear_qkv(x).view(b, s, g, per + 2, d)
        q = qkv[:, :, :, :per].reshape(b, s, g * per, d).transpose(1, 2)
        k = qkv[:, :, :, per].transpose(1, 2)
        v = qkv[:, :, :, per + 1].transpose(1, 2)
        if self.arch.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if per > 1:
            k, v = k.repeat_interleave(per, dim=1), v.repeat_interleave(per, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(arch.hidden_size, 2 * arch.ffn_hidden_size, bias=False)
        self.linear_fc2 = nn.Linear(arch.ffn_hidden_size, arch.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.scale = arch.residual_scale
        self.input_layernorm = _norm(arch, arch.hidden_size)
        self.self_attention = Attention(arch)
        self.pre_mlp_layernorm = _norm(arch, arch.hidden_size)
        self.mlp = MLP(arch)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Tensor | None) -> Tensor:
        x = x + self.scale * self.self_attention(self.input_layernorm(x), cos, sin, attend)
        return x + self.scale * self.mlp(self.pre_mlp_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(arch) for _ in range(arch.num_layers))
        self.final_layernorm = _norm(arch, arch.hidden_size)


class Embedding(nn.Module):
    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(arch.padded_vocab_size, arch.hidden_size)


class Network(nn.Module):
    """Mixin holding ``embedding``, ``decoder``, ``output_layer`` (megadiff's names) and
    computing logits; the two model classes put it at their top level."""

    def build_network(self, arch: Arch) -> None:
        self.arch = arch
        self.embedding = Embedding(arch)
        self.decoder = Decoder(arch)
        self.output_layer = nn.Linear(arch.hidden_size, arch.padded_vocab_size, bias=False)

    def logits(
        self,
        tokens: Tensor,
        attend: Tensor | None,
        positions: Tensor | None = None,
        columns: tuple[int, int] | None = None,
    ) -> Tensor:
        """Logits ``[b, s, V]``; with ``positions`` (``[b, p]``) only at those positions
        (``[b, p, V]``), with ``columns`` ``(lo, hi)`` only those vocabulary columns (a
        sampler's modality range: the output layer multiplies only the rows it needs)."""
        a = self.arch
        x = self.embedding.word_embeddings(tokens)
        head_dim = a.hidden_size // a.num_attention_heads
        cos, sin = rope_cos_sin(tokens.shape[1], head_dim, a.rotary_base, tokens.device)
        for layer in self.decoder.layers:
            x = layer(x, cos, sin, attend)
        if positions is not None:
            x = x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))
        lo, hi = (0, a.padded_vocab_size) if columns is None else columns
        out = F.linear(self.decoder.final_layernorm(x), self.output_layer.weight[lo:hi])
        if hi > a.vocab_size:
            out[..., max(a.vocab_size - lo, 0) :] = float("-inf")
        return out
