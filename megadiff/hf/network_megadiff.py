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

Block KV cache (semi-autoregressive sampling): a full forward can keep each layer's keys and
values (``kv_out``), and a later forward can run only a span of query positions per row against
them (``past`` + ``span``): the span's fresh keys/values are written over the cached ones at
their positions, then its queries attend to every position. Each layer's cache is one tensor
``[b, 2, groups, s + 1, head_dim]`` (keys, values after RoPE; the last slot is scratch, where
a span's padding slots write, never attended to).
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

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attend: Tensor | None,
        kv_out: list[Tensor] | None = None,
        past: Tensor | None = None,
        span: Tensor | None = None,
    ) -> Tensor:
        """``attend``: ``[b, 1, 1, keys]`` bool, True = this key may be attended to (or None).
        ``kv_out``: append this layer's cache (see the module docstring). ``past`` + ``span``
        (``[b, s]`` position of each of ``x``'s tokens, ``s_full`` for padding slots): write the
        tokens' keys/values into ``past`` there and attend to all of ``past``."""
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
        if kv_out is not None:
            cache = k.new_zeros(b, 2, g, s + 1, d)
            cache[:, 0, :, :s], cache[:, 1, :, :s] = k, v
            kv_out.append(cache)
        if past is not None:
            at = span[:, None, :, None].expand(b, g, s, d)
            past[:, 0].scatter_(2, at, k)
            past[:, 1].scatter_(2, at, v)
            k, v = past[:, 0], past[:, 1]
            if attend is None or attend.shape[-1] < k.shape[2]:  # scratch slot unused
                k, v = k[:, :, :-1], v[:, :, :-1]
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

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attend: Tensor | None, **cache
    ) -> Tensor:
        """``cache``: :meth:`Attention.forward`'s ``kv_out`` / ``past`` + ``span``."""
        h = self.self_attention(self.input_layernorm(x), cos, sin, attend, **cache)
        x = x + self.scale * h
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
        kv_out: list[Tensor] | None = None,
        past: list[Tensor] | None = None,
        span: Tensor | None = None,
    ) -> Tensor:
        """Logits ``[b, s, V]``; with ``positions`` (``[b, p]``) only at those positions
        (``[b, p, V]``), with ``columns`` ``(lo, hi)`` only those vocabulary columns (a
        sampler's modality range: the output layer multiplies only the rows it needs).

        Block KV cache: ``kv_out`` (a list) receives each layer's cache of this full forward.
        ``past`` (such a list, written over in place) + ``span`` (``[b, n]`` positions,
        :func:`span_positions`): only the span's tokens are run, attending to the cached
        keys/values of the other positions (``attend`` still ``[b, 1, 1, s]`` over the
        whole sequence); ``positions`` then index the span (``[b, p]`` in ``0..n-1``)."""
        a = self.arch
        head_dim = a.hidden_size // a.num_attention_heads
        s = tokens.shape[1]
        cos, sin = rope_cos_sin(s, head_dim, a.rotary_base, tokens.device)
        if span is not None:
            padded = bool((span >= s).any())
            at = span.clamp(max=s - 1)
            tokens, cos, sin = tokens.gather(1, at), cos[at][:, None], sin[at][:, None]
            if padded:  # padding slots write to the scratch slot: never a key
                keep = attend.reshape(-1, s) if attend is not None else at.new_ones(1, s).bool()
                attend = F.pad(keep, (0, 1), value=False)[:, None, None, :]
        x = self.embedding.word_embeddings(tokens)
        for i, layer in enumerate(self.decoder.layers):
            if span is not None:
                x = layer(x, cos, sin, attend, past=past[i], span=span)
            else:
                x = layer(x, cos, sin, attend, kv_out=kv_out)
        if positions is not None:
            x = x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))
        lo, hi = (0, a.padded_vocab_size) if columns is None else columns
        out = F.linear(self.decoder.final_layernorm(x), self.output_layer.weight[lo:hi])
        if hi > a.vocab_size:
            out[..., max(a.vocab_size - lo, 0) :] = float("-inf")
        return out


def span_positions(start: Tensor, length: Tensor, seq_len: int) -> Tensor:
    """``[b, max(length)]`` the positions ``start[r] .. start[r] + length[r] - 1`` of each row,
    padded with ``seq_len`` (a cache's scratch slot)."""
    j = torch.arange(int(length.max()), device=start.device)
    return torch.where(j < length[:, None], start[:, None] + j, seq_len)
