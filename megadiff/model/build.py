"""Build model chunks from the config: TransformerConfig, pipeline stages, precision, init.

Initialisation is layout-invariant: every parameter is drawn from a generator keyed by
(seed, global parameter name) in its full, unsharded shape, and this rank keeps its TP shard.
So TP/PP/VPP runs start from exactly the weights of a single-process run.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
import zlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_config import TransformerConfig

from megadiff.config import Config, ModelConfig
from megadiff.machine import is_half
from megadiff.model.model import MaskedDiffusionModel
from megadiff.model.specs import layer_spec, resolve_impl


def resolve_precision(cfg: Config) -> str:
    """``fp32`` | ``bf16`` | ``fp8``: FP8 GEMMs (Transformer Engine's or, with the local spec,
    megadiff's own) over bf16 parameters on GPU, fp32 parameters on CPU."""
    prec = cfg.train.precision
    if prec == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    if prec == "bf16" and not torch.cuda.is_available():
        raise RuntimeError("train.precision=bf16 needs a GPU; use train.precision=fp32 on CPU")
    return prec


def _skip_init(tensor: torch.Tensor) -> None:
    """Leaves the tensor as allocated; ``init_parameters`` fills every weight afterwards."""


def transformer_config(cfg: Config) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    prec = resolve_precision(cfg)
    on_gpu = torch.cuda.is_available()
    half = is_half(cfg, on_gpu)  # bf16 parameters (fp32 main weights in the optimizer)
    vpp = p.virtual_pipeline if (p.virtual_pipeline or 1) > 1 else None
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_size,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        qk_layernorm=m.qk_layernorm,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=p.sequence_parallel,
        params_dtype=torch.bfloat16 if half else torch.float32,
        pipeline_dtype=torch.bfloat16 if half else torch.float32,
        bf16=half,
        # megatron-core's init only tags TP attributes here (a no-op fill); init_parameters()
        # below draws the weights, layout-invariantly
        perform_initialization=True,
        init_method=_skip_init,
        output_layer_init_method=_skip_init,
        embedding_init_method=_skip_init,
        use_cpu_initialization=not on_gpu,
        masked_softmax_fusion=on_gpu,
        bias_activation_fusion=False,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=True,
    )
    if prec == "fp8" and resolve_impl(m) == "transformer_engine":
        kwargs.update(fp8="hybrid", fp8_recipe="tensorwise")
    kwargs.update(recompute_kwargs(m))
    with warnings.catch_warnings():  # its advice for Transformer Engine's fused core attention
        warnings.filterwarnings("ignore", message="If you are using transformer_engine")
        return TransformerConfig(**kwargs)


def recompute_kwargs(m: ModelConfig) -> dict:
    """megatron-core's activation recompute settings for ``model.recompute``: ``selective``
    checkpoints core attention (``recompute_modules=["core_attn"]``), ``full`` whole layers."""
    if m.recompute == "none":
        return {}
    if m.recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return dict(
        recompute_granularity="full",
        recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
    )


def build_model(cfg: Config, meta: bool = False) -> list[MaskedDiffusionModel]:
    """This rank's model chunks (one per virtual pipeline stage), initialised, not yet wrapped;
    ``meta``: shapes only, on the meta device (no memory, no initialisation)."""
    tcfg = transformer_config(cfg)
    spec = layer_spec(cfg.model, fp8=resolve_precision(cfg) == "fp8")
    vpp = tcfg.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for stage in range(vpp):
        vp_stage = stage if vpp > 1 else None
        with torch.device("meta") if meta else contextlib.nullcontext():
            chunk = _build_chunk(cfg, tcfg, spec, vp_stage)
        if not meta:
            if torch.cuda.is_available():
                chunk.cuda(torch.cuda.current_device())
            m = cfg.model
            init_parameters(
                chunk, cfg.train.seed, m.init_method_std, m.num_layers, m.embedding_init_std
            )
        chunks.append(chunk)
    return chunks


def _build_chunk(cfg: Config, tcfg, spec, vp_stage: int | None) -> MaskedDiffusionModel:
    return MaskedDiffusionModel(
        config=tcfg,
        layer_spec=spec,
        vocab_size=cfg.model.vocab_size,
        padded_vocab_size=cfg.model.padded_vocab_size(),
        max_seq_length=cfg.model.seq_length,
        rotary_base=cfg.model.rotary_base,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
    )


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_param_name(chunk: MaskedDiffusionModel, local_name: str) -> str:
    """``decoder.layers.<local>.`` -> ``decoder.layers.<global>.`` (layout-independent name)."""
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    layer = chunk.decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}." + local_name[m.end() :]


def is_glu_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def tp_shard(full: torch.Tensor, name: str, dim: int, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's slice of a full tensor (SwiGLU fc1 holds [gate_r; up_r] per rank)."""
    if is_glu_fc1(name):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def _param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


@torch.no_grad()
def init_parameters(
    chunk: MaskedDiffusionModel,
    seed: int,
    std: float,
    num_layers: int,
    embedding_std: float | None = None,
) -> None:
    tp = ps.get_tensor_model_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
    out_std = std / math.sqrt(2.0 * num_layers)
    for local_name, param in chunk.named_parameters():
        name = global_param_name(chunk, local_name)
        if param.dim() == 1:  # norm weights (biases are disabled)
            param.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        sharded = getattr(param, "tensor_model_parallel", False)
        dim = getattr(param, "partition_dim", 0)
        full_shape = list(param.shape)
        if sharded:
            full_shape[dim] *= tp
        scale = out_std if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else std
        if embedding_std is not None and name == "embedding.word_embeddings.weight":
            scale = embedding_std
        gen = torch.Generator().manual_seed(_param_seed(seed, name))
        full = torch.randn(full_shape, generator=gen, dtype=torch.float32) * scale
        local = tp_shard(full, name, dim, tp, tp_rank) if sharded else full
        param.copy_(local.to(param.dtype))
