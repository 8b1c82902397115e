"""A loaded :class:`~megadiff.policy.network.UnmaskingPolicy` as the sampler's ``policy``
callable (:class:`~megadiff.diffusion.strategies.PolicyFn`), optionally recording each step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from megadiff.diffusion.strategies import PolicyObservation
from megadiff.policy.actions import MODES, action_log_prob, sample_action
from megadiff.policy.network import PolicyError, UnmaskingPolicy


@dataclass
class StepRecord:
    """One sampler step of some rollouts: the policy's inputs, its action and log-likelihood."""

    rollout: Tensor  # [Ba] rollout (sample) index
    features: Tensor  # [Ba, G, F]
    masked: Tensor  # [Ba, G] bool
    candidate: Tensor  # [Ba, G] bool
    pad: Tensor  # [Ba, G] bool
    step_frac: Tensor  # [Ba]
    rank: Tensor  # [Ba, G] the action (actions.py's rank form)
    log_prob: Tensor  # [Ba] under the policy that acted
    forced: Tensor  # [Ba] candidates the policy left masked at the step cap (then committed)


@dataclass
class PolicySampler:
    """``policy(observation) -> [Ba, G]`` commit mask. ``mode``: an action mode of
    :mod:`megadiff.policy.actions` (test time: ``bernoulli-argmax``); ``tau``: the policy
    temperature; ``record``: keep a :class:`StepRecord` per call in ``steps``."""

    policy: UnmaskingPolicy
    mode: str = "bernoulli-argmax"
    tau: float = 1.0
    stop_logit: float = 0.0  # dpls
    record: bool = False
    steps: list[StepRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PolicyError(f"unknown policy action mode '{self.mode}' (known: {MODES})")
        if not self.tau > 0:
            raise PolicyError(f"policy temperature tau must be > 0, got {self.tau}")

    @property
    def features(self) -> tuple[str, ...]:
        return self.policy.features

    @torch.no_grad()
    def __call__(self, obs: PolicyObservation) -> Tensor:
        logits = self.policy(obs.features, obs.masked, obs.step_frac, obs.pad).double()
        cand = obs.candidate
        rank = sample_action(self.mode, logits, cand, self.tau, obs.generators, self.stop_logit)
        if self.record:
            lp = action_log_prob(self.mode, logits, rank, cand, self.tau, self.stop_logit)
            left = (cand & (rank < 0)).sum(1)
            self.steps.append(
                StepRecord(
                    obs.sample_ids.clone(), obs.features, obs.masked, cand, obs.pad,
                    obs.step_frac.float(), rank, lp.float(), torch.where(obs.last_step, left, 0),
                )
            )  # fmt: skip
        return rank >= 0
