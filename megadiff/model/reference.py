"""A plain-PyTorch twin of MaskedDiffusionModel (single device, no megatron-core).

Same parameter names and layouts as the full (unsharded) megatron-core model returned by
``megadiff.model.gather.full_tensors``, so ``load_state_dict`` of those tensors reproduces its
logits. Used as the bare-PyTorch baseline in ``tools/bench_step.py``, as the architecture
check in the tests, and for generation. The network itself is
:mod:`megadiff.hf.network_megadiff`, which the Hugging Face export ships as well.
"""

from __future__ import annotations

from torch import Tensor

from megadiff.hf.network_megadiff import Arch, Network
from megadiff.model.completep import multipliers


class ReferenceConfig(Arch):
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


class ReferenceModel(Network):
    """tokens [b, s] (+ optional key padding mask [b, s], True = PAD) -> logits [b, s, V];
    ``positions`` / ``columns``: only those; ``kv_out`` / ``past`` + ``span``: the block KV
    cache (see :meth:`Network.logits`)."""

    def __init__(self, cfg: Arch) -> None:
        super().__init__()
        self.cfg = cfg
        self.build_network(cfg)

    def forward(
        self,
        tokens: Tensor,
        key_pad: Tensor | None = None,
        positions: Tensor | None = None,
        columns: tuple[int, int] | None = None,
        kv_out: list[Tensor] | None = None,
        past: list[Tensor] | None = None,
        span: Tensor | None = None,
    ) -> Tensor:
        attend = None if key_pad is None else ~key_pad[:, None, None, :]  # True = attend
        return self.logits(tokens, attend, positions, columns, kv_out, past, span)
