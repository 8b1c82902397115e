"""The megatron-core model equals its plain-PyTorch twin (architecture and weight layouts):
bidirectional attention, padding mask, RoPE, GQA, QK-norm, SwiGLU, padded vocabulary."""

from __future__ import annotations

import pytest
import torch

from megadiff.parallel.launch import run_world
from tests.workers import init_stds, logits_vs_reference

VARIANTS = {
    "tp1": (1, []),
    "tp2_gqa_qknorm": (
        2,
        ["parallel.tensor_parallel=2", "model.num_query_groups=2", "model.qk_layernorm=true"],
    ),
    # CompleteP away from its base shape: residual branches scaled by (layers/base)^-alpha
    "completep": (1, ["model.parameterization=completep", "model.base_num_layers=1"]),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_reference(variant, tmp_path):
    world, overrides = VARIANTS[variant]
    out = run_world(logits_vs_reference, world, (overrides, str(tmp_path)))[0]
    ours, ref, pad = out["ours"], out["ref"], out["pad"]
    real = slice(0, 120)  # vocab_size 120 padded to 128: padded columns are -inf in both
    assert torch.isinf(ours[..., 120:]).all() and torch.isinf(ref[..., 120:]).all()
    keep = ~pad  # PAD query rows are unconstrained
    diff = (ours[..., real] - ref[..., real]).abs()[keep].max().item()
    assert diff < 1e-4, f"max |logit diff| {diff:.2e}"
    # bidirectional: changing the last token changes the first position's logits
    assert out["first_pos_moved"] > 1e-4


@pytest.mark.parametrize(
    "overrides, embedding, qkv",
    [
        ([], 0.02, 0.02),  # the embedding follows model.init_method_std by default
        (["model.init_method_std=0.05", "model.embedding_init_std=1.0"], 1.0, 0.05),
    ],
)
def test_embedding_init_std(overrides, embedding, qkv, tmp_path):
    out = run_world(init_stds, 1, (overrides, str(tmp_path)))[0]
    assert out["embedding"] == pytest.approx(embedding, rel=0.05)
    assert out["qkv"] == pytest.approx(qkv, rel=0.05)
