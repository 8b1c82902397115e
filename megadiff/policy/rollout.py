"""Rollouts of the unmasking policy: batched sampler runs with the frozen dLLM decoding greedily
(temperature 0), so that all randomness is the policy's (each rollout its own seed). Every step
records the policy's inputs, its action and the action's log-likelihood."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from megadiff.diffusion.sampling import LogitsFn, SampleOutput, SamplerConfig, sample
from megadiff.policy.actions import action_log_prob, bernoulli_entropy
from megadiff.policy.network import UnmaskingPolicy
from megadiff.policy.sampler import PolicySampler


@dataclass
class Steps:
    """Every step of a set of rollouts, ``S`` rows (one per rollout and step)."""

    rollout: Tensor  # [S] rollout index
    features: Tensor  # [S, G, F]
    masked: Tensor  # [S, G] bool
    candidate: Tensor  # [S, G] bool
    pad: Tensor  # [S, G] bool
    step_frac: Tensor  # [S]
    rank: Tensor  # [S, G] the action
    old_log_prob: Tensor  # [S] under the policy that acted
    forced: Tensor  # [S] positions left to the step cap


@dataclass
class Rollouts:
    output: SampleOutput  # tokens, NFE, steps per rollout
    steps: Steps

    def still_masked(self) -> Tensor:
        """``[N]`` positions each rollout's policy left masked when its step cap ran out."""
        n = len(self.output.nfe)
        return torch.zeros(n, dtype=torch.long).index_add_(0, self.steps.rollout, self.steps.forced)


def collect(
    logits_fn: LogitsFn,
    tokens: Tensor,
    modality: Tensor,
    ranges: Tensor,
    mask_id: int,
    cfg: SamplerConfig,
    sampler: PolicySampler,
    seeds: Sequence[int],
    cond: Tensor | None = None,
) -> Rollouts:
    """Run the buffers ``tokens`` ``[N, L]`` to the end with ``sampler`` (strategy policy,
    temperature 0) and gather its records."""
    if cfg.strategy != "policy" or cfg.temperature != 0:
        raise ValueError("rollouts use strategy 'policy' with the dLLM at temperature 0")
    sampler.steps = []
    sampler.record = True
    was_training = sampler.policy.training
    sampler.policy.eval()
    try:
        out = sample(logits_fn, tokens, modality, ranges, mask_id, cfg, cond, seeds, sampler)
    finally:
        sampler.policy.train(was_training)
    recs = sampler.steps
    sampler.steps = []
    cat = lambda name: torch.cat([getattr(r, name) for r in recs])  # noqa: E731
    steps = Steps(
        cat("rollout"), cat("features"), cat("masked"), cat("candidate"), cat("pad"),
        cat("step_frac"), cat("rank"), cat("log_prob"), cat("forced"),
    )  # fmt: skip
    return Rollouts(out, steps)


def policy_log_probs(
    policy: UnmaskingPolicy, steps: Steps, mode: str, tau: float, stop_logit: float = 0.0
) -> tuple[Tensor, Tensor]:
    """``[S]`` log-likelihood of each recorded action under ``policy`` (with grad) and ``[S]``
    the mean Bernoulli entropy of its candidates."""
    logits = policy(steps.features, steps.masked, steps.step_frac, steps.pad).double()
    lp = action_log_prob(mode, logits, steps.rank, steps.candidate, tau, stop_logit)
    return lp, bernoulli_entropy(logits.detach(), steps.candidate, tau)
