"""CompleteP-style parameterisation (Dey et al. 2025): width/depth transfer of a base recipe.

Relative to a base model of width ``base_hidden_size`` and depth ``base_num_layers``
(width ratio m_N = hidden / base_hidden, depth ratio m_L = layers / base_layers):

* every residual branch (attention and MLP output) is scaled by m_L ** -alpha before it is added
  to the residual stream (alpha = 1 is CompleteP; 0.5 is depth-muP);
* hidden-layer matrices (the transformer layers' 2-D weights) get AdamW lr x m_L ** (alpha - 1)
  / m_N and eps x 1 / m_N; embeddings, the output layer and norms keep the base values.

At the base shape every multiplier is exactly 1 and the model is the standard one. Weight
initialisation is not rescaled here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from megadiff.config import ModelConfig


@dataclass(frozen=True)
class Multipliers:
    residual: float  # residual-branch output scale
    hidden_lr: float  # lr multiplier of hidden-layer matrices
    hidden_eps: float  # AdamW eps multiplier of hidden-layer matrices


def multipliers(m: ModelConfig) -> Multipliers:
    """The CompleteP multipliers of ``m`` (all 1.0 for ``parameterization: standard``)."""
    if m.parameterization != "completep":
        return Multipliers(1.0, 1.0, 1.0)
    width = m.hidden_size / (m.base_hidden_size or m.hidden_size)
    depth = m.num_layers / (m.base_num_layers or m.num_layers)
    a = m.depth_alpha
    return Multipliers(depth**-a, depth ** (a - 1.0) / width, 1.0 / width)


def is_hidden_matrix(name: str, ndim: int) -> bool:
    """A transformer layer's weight matrix (QKV, attention output, MLP fc1/fc2)."""
    return ndim == 2 and "decoder.layers." in name


class ScaledBiasDropoutAdd:
    """megatron-core's bias-dropout-add with the branch output scaled first:
    ``residual + dropout(scale * (x + bias))``. Used as the layer spec's ``*_bda`` module."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, training: bool, fused: bool) -> Callable:
        from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

        inner = get_bias_dropout_add(training, fused)
        s = self.scale

        def bda(x_with_bias: tuple[Tensor, Tensor | None], residual: Tensor, prob: float):
            x, bias = x_with_bias
            return inner((x * s, None if bias is None else bias * s), residual, prob)

        return bda
