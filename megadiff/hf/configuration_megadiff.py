"""Hugging Face config of an exported megadiff model (self-contained: only ``transformers``).

Copied next to the exported weights; loaded with ``AutoConfig.from_pretrained(dir,
trust_remote_code=True)``.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MegadiffConfig(PretrainedConfig):
    """Shape of a bidirectional masked-diffusion transformer plus its vocabulary layout.

    ``vocab_size`` is the real vocabulary; embedding and output rows are padded to
    ``padded_vocab_size`` and the padded logit columns are -inf (as in megadiff).
    ``modality_ranges`` maps ``text``/``image``/``audio`` to ``[start, end)`` id ranges.
    """

    model_type = "megadiff"

    def __init__(
        self,
        vocab_size: int = 512,
        padded_vocab_size: int | None = None,
        vocab_pad_multiple: int = 64,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        intermediate_size: int = 192,
        max_position_embeddings: int = 128,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        normalization: str = "RMSNorm",
        qk_layernorm: bool = False,
        residual_scale: float = 1.0,
        initializer_range: float = 0.02,
        mask_token_id: int | None = None,
        pad_token_id: int | None = None,
        modality_ranges: dict[str, list[int]] | None = None,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size or vocab_size
        self.vocab_pad_multiple = vocab_pad_multiple
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        self.normalization = normalization
        self.qk_layernorm = qk_layernorm
        self.residual_scale = residual_scale
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        self.modality_ranges = dict(modality_ranges or {})
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(pad_token_id=pad_token_id, **kwargs)
