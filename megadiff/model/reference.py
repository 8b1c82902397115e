"""A plain-PyTorch twin of MaskedDiffusionModel (single device, no megatron-core).

Same parameter names and layouts as the full (unsharded) megatron-core model returned by
``megadiff.model.gather.full_tensors``, so ``load_state_dict`` of those tensors reproduces its
logits. Used as the bare-PyTorch baseline in ``tools/bench_step.py``, as the architecture
check in the tests, and as the basis of the Hugging Face modeling code.

Layouts (megatron-core conventions): ``linear_qkv`` rows are grouped per query group as
``[q_1..q_{h/g}, k, v]`` (each ``head_dim`` rows); ``linear_fc1`` is ``[gate; up]`` with
``silu(gate) * up``; RoPE rotates halves (non-interleaved).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megadiff.model.completep import multipliers


@dataclass
class ReferenceConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int  # real vocabulary; logits past it are -inf
    padded_vocab_size: int
    qk_layernorm: bool = False
    rotary_base: int = 10000
    norm_epsilon: float = 1e-5
    normalization: str = "RMSNorm"
    residual_scale: float = 1.0  # CompleteP: residual branches scaled by depth^-alpha

    @classmethod
    def from_model_config(cls, m) -> ReferenceConfig:
        return cls(
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            num_attention_heads=m.num_attention_heads,
            num_query_groups=m.num_query_groups or m.num_attention_heads,
            ffn_hidden_size=m.ffn_size,
            vocab_size=m.vocab_size,
            padded_vocab_size=m.padded_vocab_size(),
            qk_layernorm=m.qk_layernorm,
            rotary_base=m.rotary_base,
            norm_epsilon=m.norm_epsilon,
            normalization=m.normalization,
            residual_scale=multipliers(m).residual,
        )


def _norm(cfg: ReferenceConfig, dim: int) -> nn.Module:
    if cfg.normalization == "RMSNorm":
        return nn.RMSNorm(dim, eps=cfg.norm_epsilon)
    return nn.LayerNorm(dim, eps=cfg.norm_epsilon)


def rope_cos_sin(seq_len: int, head_dim: int, base: int, device=None) -> tuple[Tensor, Tensor]:
    inv = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    )
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv)
    emb = torch.cat([freqs, freqs], dim=-1)  # [s, d]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [b, heads, s, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * self.head_dim
        self.linear_qkv = nn.Linear(cfg.hidden_size, qkv_rows, bias=False)
        self.linear_proj = nn.Linear(
            cfg.num_attention_heads * self.head_dim, cfg.hidden_size, bias=False
        )
        if cfg.qk_layernorm:
            self.q_layernorm = _norm(cfg, self.head_dim)
            self.k_layernorm = _norm(cfg, self.head_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_pad: Tensor | None) -> Tensor:
        b, s, _ = x.shape
        c, d = self.cfg, self.head_dim
        g, per = c.num_query_groups, c.num_attention_heads // c.num_query_groups
        qkv = self.linear_qkv(x).view(b, s, g, per + 2, d)
        q = qkv[:, :, :, :per].reshape(b, s, g * per, d).transpose(1, 2)
        k = qkv[:, :, :, per].transpose(1, 2)
        v = qkv[:, :, :, per + 1].transpose(1, 2)
        if c.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if per > 1:
            k = k.repeat_interleave(per, dim=1)
            v = v.repeat_interleave(per, dim=1)
        mask = None if key_pad is None else ~key_pad[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=False)
        self.linear_fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.scale = cfg.residual_scale
        self.input_layernorm = _norm(cfg, cfg.hidden_size)
        self.self_attention = Attention(cfg)
        self.pre_mlp_layernorm = _norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_pad: Tensor | None) -> Tensor:
        x = x + self.scale * self.self_attention(self.input_layernorm(x), cos, sin, key_pad)
        return x + self.scale * self.mlp(self.pre_mlp_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = _norm(cfg, cfg.hidden_size)


class Embedding(nn.Module):
    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)


class ReferenceModel(nn.Module):
    """tokens [b, s] (+ optional key padding mask [b, s], True = PAD) -> logits [b, s, V]."""

    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = Embedding(cfg)
        self.decoder = Decoder(cfg)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False)

    def forward(self, tokens: Tensor, key_pad: Tensor | None = None) -> Tensor:
        c = self.cfg
        x = self.embedding.word_embeddings(tokens)
        cos, sin = rope_cos_sin(
            tokens.shape[1], c.hidden_size // c.num_attention_heads, c.rotary_base, tokens.device
        )
        for layer in self.decoder.layers:
            x = layer(x, cos, sin, key_pad)
        logits = self.output_layer(self.decoder.final_layernorm(x))
        if c.padded_vocab_size > c.vocab_size:
            logits[..., c.vocab_size :] = float("-inf")
        return logits
