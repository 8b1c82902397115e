"""Transformer layer specs: Transformer Engine layers on GPU when present, local layers otherwise.

Both are megatron-core's own GPT layer specs with the attention made bidirectional
(``AttnMaskType.padding``: only PAD keys are masked, and only when a mask is passed); the local
spec's core attention is torch's fused SDPA (``megadiff.model.attention``), and with ``fp8`` its
four linears run their GEMMs in FP8 (``megadiff.model.fp8``).
"""

from __future__ import annotations

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megadiff.config import ModelConfig
from megadiff.machine import transformer_engine_available
from megadiff.model.attention import SDPAttention


def resolve_impl(cfg: ModelConfig) -> str:
    impl = cfg.transformer_impl
    if impl == "auto":
        return "transformer_engine" if transformer_engine_available() else "local"
    if impl == "transformer_engine" and not transformer_engine_available():
        raise RuntimeError(
            "model.transformer_impl=transformer_engine needs CUDA and Transformer Engine "
            "(pip install -e '.[gpu]' on a GPU box); use model.transformer_impl=local on CPU"
        )
    return impl


def layer_spec(cfg: ModelConfig, fp8: bool = False) -> ModuleSpec:
    """The per-layer ``ModuleSpec`` for a bidirectional pre-norm SwiGLU block; ``fp8``: FP8
    GEMMs (Transformer Engine's through the TransformerConfig, the local spec's here)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if resolve_impl(cfg) == "transformer_engine":
        spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)
    else:
        spec = specs.get_gpt_layer_local_spec(
            qk_layernorm=cfg.qk_layernorm, normalization=cfg.normalization
        )
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
        if fp8:
            from megadiff.model.fp8 import Fp8ColumnParallelLinear, Fp8RowParallelLinear

            attn, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
            attn.linear_qkv = mlp.linear_fc1 = Fp8ColumnParallelLinear
            attn.linear_proj = mlp.linear_fc2 = Fp8RowParallelLinear
    spec.submodules.self_attention.params = {
        **spec.submodules.self_attention.params,
        "attn_mask_type": AttnMaskType.padding,
    }
    if cfg.parameterization == "completep":  # residual branches x (layers / base) ** -alpha
        from megadiff.model.completep import ScaledBiasDropoutAdd, multipliers

        bda = ModuleSpec(module=ScaledBiasDropoutAdd, params={"scale": multipliers(cfg).residual})
        spec.submodules.self_attn_bda = bda
        spec.submodules.mlp_bda = bda
    return spec
