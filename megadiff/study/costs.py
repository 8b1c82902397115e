"""What a resolved config costs: parameters (total, embedding, non-embedding, per pipeline
stage) and training FLOPs per token, from the config alone (no model is built).

Training FLOPs per token (forward + backward = 3 x forward, multiply-add = 2 FLOPs):

    6 * (N + V_pad * h)  +  12 * L * s * h

``N`` is the non-embedding parameter count less the norm weights (its matmuls), ``V_pad * h``
the output layer's
(the input embedding is a lookup, no FLOPs), and ``12 L s h`` bidirectional attention: per layer
and token the scores ``Q K^T`` and their product with ``V`` take ``2 * 2 * s * h`` forward FLOPs
over the full sequence ``s`` (no causal halving: every position attends to every other).
Recomputed activations (``model.recompute``) are extra work not counted here, as in MFU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megadiff.config import Config, ModelConfig


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of one model shape; ``per_stage`` lists each pipeline stage's (all TP ranks
    of the stage together): the first holds the input embedding, the last the final norm and
    the output layer."""

    total: int
    embedding: int  # input embedding + output layer (untied)
    non_embedding: int  # the transformer layers and the final norm: Chinchilla's N
    per_stage: tuple[int, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def parameter_counts(m: ModelConfig, pipeline_parallel: int = 1) -> ParameterCounts:
    """Parameter counts of a shape whose ``vocab_size`` is resolved."""
    h, vocab = m.hidden_size, m.padded_vocab_size()
    layers = m.layer_parameter_count() * (m.num_layers // pipeline_parallel)
    final_norm = m.norm_parameter_count(h)
    if pipeline_parallel == 1:
        stages = (layers + 2 * vocab * h + final_norm,)
    else:
        middle = (layers,) * (pipeline_parallel - 2)
        stages = (layers + vocab * h, *middle, layers + vocab * h + final_norm)
    total = m.parameter_count()
    return ParameterCounts(
        total=total,
        embedding=2 * vocab * h,
        non_embedding=total - 2 * vocab * h,
        per_stage=stages,
    )


def flops_per_token(m: ModelConfig) -> int:
    """Training FLOPs per token: ``6 (N + V_pad h) + 12 L s h`` (module docstring), N counted
    without the norm weights (they do no matmul)."""
    h = m.hidden_size
    norms = m.num_layers * m.layer_norm_parameter_count() + m.norm_parameter_count(h)
    matmul = parameter_counts(m).non_embedding - norms + m.padded_vocab_size() * h
    return 6 * matmul + 12 * m.num_layers * m.seq_length * h


def training_flops(cfg: Config, tokens: int) -> int:
    """FLOPs to train ``cfg``'s model (vocabulary resolved) on ``tokens`` tokens."""
    return flops_per_token(cfg.model) * tokens
