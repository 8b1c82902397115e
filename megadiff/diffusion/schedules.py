"""Masking schedules alpha(t) (probability a token is still clean at time t) and ELBO weights.

alpha(0) = 1 (clean), alpha(1) = 0 (all masked; log-linear reaches ``eps``). The ELBO weight of a
masked token is w(t) = -alpha'(t) / (1 - alpha(t)); for the linear schedule that is 1/t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SCHEDULES = ("linear", "cosine", "polynomial", "loglinear")


@dataclass(frozen=True)
class Schedule:
    name: str = "linear"
    exponent: float = 2.0  # polynomial
    eps: float = 1e-3  # log-linear: alpha(1) = eps

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule '{self.name}' (choose from {', '.join(SCHEDULES)})")

    def alpha(self, t: Tensor) -> Tensor:
        if self.name == "linear":
            return 1.0 - t
        if self.name == "cosine":
            return torch.cos(0.5 * math.pi * t)
        if self.name == "polynomial":
            return 1.0 - t.pow(self.exponent)
        return 1.0 - (1.0 - self.eps) * t  # loglinear: exp(-sigma), sigma = -log(1-(1-eps)t)

    def alpha_prime(self, t: Tensor) -> Tensor:
        if self.name == "linear":
            return -torch.ones_like(t)
        if self.name == "cosine":
            return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)
        if self.name == "polynomial":
            return -self.exponent * t.pow(self.exponent - 1.0)
        return torch.full_like(t, -(1.0 - self.eps))

    def mask_prob(self, t: Tensor) -> Tensor:
        return 1.0 - self.alpha(t)

    def weight(self, t: Tensor) -> Tensor:
        """ELBO weight -alpha'(t) / (1 - alpha(t)) for t in (0, 1]."""
        return -self.alpha_prime(t) / (1.0 - self.alpha(t))
