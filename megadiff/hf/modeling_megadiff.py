"""Hugging Face modeling code of an exported megadiff model (self-contained: torch +
``transformers`` only; copied next to the weights and loaded with ``trust_remote_code=True``).

The network is megadiff's plain-PyTorch twin (``megadiff/model/reference.py``) with the same
parameter names as megadiff's full tensors: pre-norm transformer, **bidirectional** attention
(padding-only mask), RoPE (non-interleaved halves), optional QK-norm, GQA, SwiGLU.
Megatron-core layouts: ``linear_qkv`` rows are grouped per query group as
``[q_1..q_{h/g}, k, v]``; ``linear_fc1`` is ``[gate; up]``.

Padded vocabulary: embedding and output keep megadiff's padded rows, and logit columns
``>= config.vocab_size`` are -inf, so logits equal megadiff's over every column.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_megadiff import MegadiffConfig


def _norm(cfg: MegadiffConfig, dim: int) -> nn.Module:
    if cfg.normalization == "RMSNorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


def rope_cos_sin(seq_len: int, head_dim: int, base: float, device=None) -> tuple[Tensor, Tensor]:
    inv = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    )
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [b, heads, s, d]; rotates halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: MegadiffConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * self.head_dim
        self.linear_qkv = nn.Linear(cfg.hidden_size, rows, bias=False)
        self.linear_proj = nn.Linear(
            cfg.num_attention_heads * self.head_dim, cfg.hidden_size, bias=False
        )
        if cfg.qk_layernorm:
            self.q_layernorm = _norm(cfg, self.head_dim)
            self.k_layernorm = _norm(cfg, self.head_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Tensor | None) -> Tensor:
        b, s, _ = x.shape
        g, d = self.cfg.num_key_value_heads, self.head_dim
        per = self.cfg.num_attention_heads // g
        qkv = self.linear_qkv(x).view(b, s, g, per + 2, d)
        q = qkv[:, :, :, :per].reshape(b, s, g * per, d).transpose(1, 2)
        k = qkv[:, :, :, per].transpose(1, 2)
        v = qkv[:, :, :, per + 1].transpose(1, 2)
        if self.cfg.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if per > 1:
            k, v = k.repeat_interleave(per, dim=1), v.repeat_interleave(per, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: MegadiffConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, cfg: MegadiffConfig) -> None:
        super().__init__()
        self.scale = cfg.residual_scale
        self.input_layernorm = _norm(cfg, cfg.hidden_size)
        self.self_attention = Attention(cfg)
        self.pre_mlp_layernorm = _norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Tensor | None) -> Tensor:
        x = x + self.scale * self.self_attention(self.input_layernorm(x), cos, sin, attend)
        return x + self.scale * self.mlp(self.pre_mlp_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: MegadiffConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = _norm(cfg, cfg.hidden_size)


class Embedding(nn.Module):
    def __init__(self, cfg: MegadiffConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)


class MegadiffForMaskedDiffusion(PreTrainedModel):
    """``input_ids [b, s]`` (+ ``attention_mask [b, s]``, 1 = token, 0 = padding) ->
    ``MaskedLMOutput(logits [b, s, padded_vocab_size])``; no causal mask."""

    config_class = MegadiffConfig
    base_model_prefix = "megadiff"
    _no_split_modules = ["Layer"]

    def __init__(self, config: MegadiffConfig) -> None:
        super().__init__(config)
        self.embedding = Embedding(config)
        self.decoder = Decoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding.word_embeddings

    def get_output_embeddings(self) -> nn.Module:
        return self.output_layer

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple:
        c = self.config
        x = self.embedding.word_embeddings(input_ids)
        head_dim = c.hidden_size // c.num_attention_heads
        cos, sin = rope_cos_sin(input_ids.shape[1], head_dim, c.rope_theta, input_ids.device)
        attend = None
        if attention_mask is not None:
            attend = attention_mask.bool()[:, None, None, :]  # True = attend to this key
        for layer in self.decoder.layers:
            x = layer(x, cos, sin, attend)
        logits = self.output_layer(self.decoder.final_layernorm(x))
        if c.padded_vocab_size > c.vocab_size:
            logits[..., c.vocab_size :] = float("-inf")
        loss = None
        if labels is not None:  # plain masked-LM loss on labels != -100 (no ELBO weighting)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), -100)
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return MaskedLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        steps: int | None = None,
        modality: str | None = None,
        token_range: tuple[int, int] | None = None,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Fill the MASK positions of ``input_ids`` by confidence-ordered unmasking.

        Each of ``steps`` forward passes (default: one per masked position) restricts logits to
        ``token_range`` or ``config.modality_ranges[modality]`` (default: the real vocabulary),
        picks a token per masked position (argmax, or Gumbel-max at ``temperature > 0``),
        and commits the ``ceil(remaining / steps_left)`` most confident ones in each row.
        Returns the filled ids (other positions unchanged).
        """
        c = self.config
        if c.mask_token_id is None:
            raise ValueError("config.mask_token_id is not set")
        if token_range is None:
            token_range = c.modality_ranges[modality] if modality else (0, c.vocab_size)
        lo, hi = token_range
        x = input_ids.clone()
        masked = x == c.mask_token_id
        if attention_mask is not None:
            masked &= attention_mask.bool()
        steps = steps or int(masked.sum(1).max())
        allowed = torch.zeros(c.padded_vocab_size, dtype=torch.bool, device=x.device)
        allowed[lo:hi] = True
        for i in range(steps):
            remaining = masked.sum(1)
            if int(remaining.max()) == 0:
                break
            logits = self(x, attention_mask).logits.double()
            logits = logits.masked_fill(~allowed, float("-inf"))
            probs = logits.softmax(-1)
            scores = logits
            if temperature > 0:
                u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(x.device)
                scores = logits / temperature - torch.log(-torch.log(u.clamp_min(1e-300)))
            pred = scores.argmax(-1)
            conf = probs.gather(-1, pred[..., None]).squeeze(-1)
            conf = conf.masked_fill(~masked, -1.0)
            k = torch.ceil(remaining / (steps - i)).long()
            order = conf.argsort(dim=1, descending=True)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(x.shape[1], device=x.device).expand_as(order))
            commit = masked & (rank < k[:, None])
            x = torch.where(commit, pred, x)
            masked &= ~commit
        return x


MegadiffModel = MegadiffForMaskedDiffusion
