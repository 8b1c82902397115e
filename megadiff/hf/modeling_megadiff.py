"""Hugging Face modeling code of an exported megadiff model (self-contained: torch +
``transformers`` and the two files beside it; copied next to the weights and loaded with
``trust_remote_code=True``).

The network is ``network_megadiff.py`` (megadiff's own plain-PyTorch twin of its megatron-core
model), with the same parameter names as megadiff's full tensors: pre-norm transformer,
**bidirectional** attention (padding-only mask), RoPE (non-interleaved halves), optional
QK-norm, GQA, SwiGLU.

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
from .network_megadiff import Arch, Network


def arch(cfg: MegadiffConfig) -> Arch:
    """The network's shape from the Hugging Face config (names differ, values are the same)."""
    return Arch(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        ffn_hidden_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        padded_vocab_size=cfg.padded_vocab_size,
        qk_layernorm=cfg.qk_layernorm,
        rotary_base=cfg.rope_theta,
        norm_epsilon=cfg.norm_eps,
        normalization=cfg.normalization,
        residual_scale=cfg.residual_scale,
    )


class MegadiffForMaskedDiffusion(PreTrainedModel, Network):
    """``input_ids [b, s]`` (+ ``attention_mask [b, s]``, 1 = token, 0 = padding) ->
    ``MaskedLMOutput(logits [b, s, padded_vocab_size])``; no causal mask."""

    config_class = MegadiffConfig
    base_model_prefix = "megadiff"
    _no_split_modules = ["Layer"]

    def __init__(self, config: MegadiffConfig) -> None:
        super().__init__(config)
        self.build_network(arch(config))
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
        attend = None
        if attention_mask is not None:
            attend = attention_mask.bool()[:, None, None, :]  # True = attend to this key
        logits = self.logits(input_ids, attend)
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
