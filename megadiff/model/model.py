"""MaskedDiffusionModel: a bidirectional transformer over one tri-modal token stream.

Plain megatron-core modules: vocab-parallel embedding -> ``TransformerBlock`` (RoPE, SwiGLU,
optional QK-norm, padding-only attention mask) -> vocab-parallel output layer. With pipeline
parallelism each stage builds only its part (``pre_process`` = embedding, ``post_process`` =
final norm + output layer). There is no time conditioning.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class MaskedDiffusionModel(MegatronModule):
    """One pipeline chunk of the masked diffusion transformer.

    ``forward(tokens [b, s], attention_mask)`` returns vocab-parallel logits ``[s, b, V/tp]`` on
    the last stage and hidden states ``[s, b, h]`` elsewhere. Logit columns past the real
    vocabulary (padding rows added for TP divisibility) are -inf.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: ModuleSpec,
        vocab_size: int,
        padded_vocab_size: int,
        max_seq_length: int,
        rotary_base: int = 10000,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ) -> None:
        super().__init__(config=config)
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = False
        self.model_type = _encoder_or_decoder()
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=padded_vocab_size,
                max_sequence_length=max_seq_length,
                position_embedding_type="none",
            )
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_base=rotary_base,
            use_cpu_initialization=not torch.cuda.is_available(),
        )
        self.decoder = TransformerBlock(
            config=config,
            spec=layer_spec,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                padded_vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,
            )

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor]) -> None:
        """Pipeline schedules hand the previous stage's activations in here."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        rotary_positions: Tensor | None = None,
    ) -> Tensor:
        """``positions`` ``[b, p]`` (last stage, no sequence parallelism): logits ``[p, b,
        V/tp]`` of those positions only (a sampler's candidates). ``rotary_positions`` ``[b,
        s]``: the position of each token for RoPE (a span of a longer buffer, as a block KV
        cache runs it; default ``0 .. s - 1``)."""
        seq_len = tokens.shape[1]
        hidden = self.embedding(input_ids=tokens, position_ids=None) if self.pre_process else None
        if rotary_positions is None:
            rotary = self.rotary_pos_emb(seq_len)  # [s, 1, 1, d]
        else:
            table = self.rotary_pos_emb(int(rotary_positions.max()) + 1)[:, 0]
            rotary = table[rotary_positions.t().to(table.device)]  # [s, b, 1, d]
        hidden = self.decoder(
            hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rotary
        )
        if not self.post_process:
            return hidden
        if positions is not None:
            if self.config.sequence_parallel:
                raise ValueError("positions= needs the whole sequence (sequence_parallel off)")
            at = positions.t().to(hidden.device)  # [p, b]
            hidden = hidden.gather(0, at[..., None].expand(-1, -1, hidden.shape[-1]))
        logits, _ = self.output_layer(hidden)
        return self._mask_padded_vocab(logits)

    def _mask_padded_vocab(self, logits: Tensor) -> Tensor:
        if self.padded_vocab_size == self.vocab_size:
            return logits
        per_rank = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * per_rank
        first_pad = self.vocab_size - start
        if first_pad >= per_rank:
            return logits
        col = torch.arange(per_rank, device=logits.device)
        return logits.masked_fill(col >= max(first_pad, 0), float("-inf"))


def _encoder_or_decoder():
    from megatron.core.enums import ModelType

    return ModelType.encoder_or_decoder
