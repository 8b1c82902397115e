"""The sampler's settings (:class:`SamplerConfig`) and its error type."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from megadiff.diffusion.block_cache import CACHES
from megadiff.diffusion.strategies import COUNT_STRATEGIES, STRATEGIES


class SamplingError(ValueError):
    """Bad sampler settings or input buffer."""


@dataclass
class SamplerConfig:
    strategy: str = "confidence"
    steps: int | None = None  # count strategies: total steps; adaptive: a cap (None = none)
    block_length: int | None = None  # None = full diffusion (one block)
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    threshold: float = 0.9  # strategy 'threshold' (Fast-dLLM tau)
    entropy_bound: float = 0.1  # strategy 'entropy' (EB-sampler gamma, nats)
    cfg_scale: float = 0.0  # classifier-free guidance s; 0 = off
    cache: str = "none"  # block KV cache: none (exact), prefix, dual (needs block_length)

    @property
    def deterministic(self) -> bool:
        """True when the seed changes nothing: greedy tokens (temperature 0) and a commit order
        read from the logits (every strategy but ``random`` and ``policy``, whose actions are
        drawn)."""
        return self.temperature == 0 and self.strategy not in ("random", "policy")

    def validate(self) -> SamplerConfig:
        for name in ("temperature", "top_p", "threshold", "entropy_bound", "cfg_scale"):
            if not math.isfinite(getattr(self, name)):
                raise SamplingError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.strategy not in STRATEGIES:
            raise SamplingError(
                f"unknown strategy '{self.strategy}' (known: {', '.join(STRATEGIES)})"
            )
        if self.steps is not None and self.steps < 1:
            raise SamplingError(f"steps must be >= 1, got {self.steps}")
        if self.strategy in COUNT_STRATEGIES and self.steps is None:
            raise SamplingError(f"strategy '{self.strategy}' needs a step count (steps)")
        if not 0.0 < self.threshold <= 1.0:
            raise SamplingError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.block_length is not None and self.block_length < 1:
            raise SamplingError(f"block_length must be >= 1, got {self.block_length}")
        if self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.entropy_bound < 0:
            raise SamplingError(f"entropy_bound must be >= 0, got {self.entropy_bound}")
        if self.cfg_scale < 0:
            raise SamplingError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.cache not in CACHES:
            raise SamplingError(f"unknown cache '{self.cache}' (known: {', '.join(CACHES)})")
        if self.cache != "none" and self.strategy == "policy":
            raise SamplingError(
                f"cache '{self.cache}' with strategy 'policy': the policy reads every generated "
                "position's logits at each step, which a cached span forward does not give; "
                "use cache 'none'"
            )
        if self.cache != "none" and self.block_length is None:
            raise SamplingError(
                f"cache '{self.cache}' needs semi-autoregressive blocks: with one block it is "
                "never refreshed and only skips what lies outside the generated span; set "
                "block_length (e.g. 32) or cache 'none'"
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)
