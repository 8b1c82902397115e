"""Accuracy vs mean NFE of unmasking rules on a verifiable task: the heuristics (confidence with
fixed steps, threshold at several tau, entropy at several gamma, margin) and a learned policy, at
matched settings (same checkpoint, held-out prompts, generation length and blocks, greedy
tokens), each accuracy with its 95% Wilson interval.

Used by ``megadiff policy eval`` and ``tools/eval_sampling.py --frontier``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from megadiff.diffusion.sampling import SamplerConfig
from megadiff.policy.tasks import PolicyTask

TAUS = (0.1, 0.3, 0.5, 0.7, 0.9, 0.95)  # threshold strategy
GAMMAS = (0.01, 0.1, 0.5, 1.0, 2.0, 4.0)  # entropy strategy (nats)
STEP_DIVISORS = (1, 2, 4, 8)  # confidence at L / d fixed steps, and at 1 step (all at once)


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion ``k / n``."""
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


@dataclass
class Point:
    """One sampler setting's result on the task's prompts."""

    label: str
    strategy: str
    n: int
    accuracy: float  # mean reward
    low: float  # 95% Wilson interval of the accuracy
    high: float
    nfe: float  # mean forward passes per sample
    seconds: float
    block_length: int | None
    gen_length: int

    def row(self) -> str:
        return (
            f"| {self.label} | {self.accuracy:.3f} | [{self.low:.3f}, {self.high:.3f}] | "
            f"{self.nfe:.2f} | {self.n} | {self.seconds:.0f} |"
        )


def heuristic_settings(
    gen_length: int,
    block_length: int | None = None,
    taus: Sequence[float] = TAUS,
    gammas: Sequence[float] = GAMMAS,
) -> list[tuple[str, SamplerConfig]]:
    """The heuristics compared with a policy: ``confidence`` at fixed steps (one token per step,
    L/2, L/4, L/8 and one step), ``margin`` at one token per step, ``threshold`` per tau and
    ``entropy`` per gamma (at most one step per generated token); all greedy."""
    steps = sorted({max(1, gen_length // d) for d in STEP_DIVISORS} | {1}, reverse=True)
    kw = dict(block_length=block_length, temperature=0.0)
    out = [(f"confidence steps={s}", SamplerConfig("confidence", steps=s, **kw)) for s in steps]
    out.append((f"margin steps={gen_length}", SamplerConfig("margin", steps=gen_length, **kw)))
    cap = dict(kw, steps=gen_length)
    out += [(f"threshold tau={t:g}", SamplerConfig("threshold", threshold=t, **cap)) for t in taus]
    out += [
        (f"entropy gamma={g:g}", SamplerConfig("entropy", entropy_bound=g, **cap)) for g in gammas
    ]
    return out


def evaluate_setting(
    bundle: Any,
    task: PolicyTask,
    prompts: list[str],
    label: str,
    cfg: SamplerConfig,
    gen_length: int,
    batch_size: int = 64,
    policy: Any = None,
) -> Point:
    """Generate one completion per prompt (text task, sample ``i`` seed ``i``) and score it."""
    from megadiff.generation.api import generate

    t0 = time.perf_counter()
    seeds = list(range(len(prompts)))
    kw = {"policy": policy} if policy is not None else {}
    recs = generate(bundle, "text", prompts, cfg, seeds, batch_size, gen_length, **kw)
    rewards = [task.reward(r["prompt"], r["text"]) for r in recs]
    n = len(recs)
    acc = sum(rewards) / n
    lo, hi = wilson(sum(rewards), n)
    nfe = sum(r["nfe"] for r in recs) / n
    secs = time.perf_counter() - t0
    return Point(label, cfg.strategy, n, acc, lo, hi, nfe, secs, cfg.block_length, gen_length)


def compare(
    bundle: Any,
    task: PolicyTask,
    prompts: list[str],
    gen_length: int,
    block_length: int | None = None,
    taus: Sequence[float] = TAUS,
    gammas: Sequence[float] = GAMMAS,
    policies: Sequence[tuple[str, Any, SamplerConfig]] = (),
    batch_size: int = 64,
    log=None,
) -> list[Point]:
    """Every heuristic, then each ``(label, policy, sampler settings)``, on the same prompts."""
    runs = [(label, cfg, None) for label, cfg in heuristic_settings(
        gen_length, block_length, taus, gammas
    )]  # fmt: skip
    runs += [(label, cfg, pol) for label, pol, cfg in policies]
    points = []
    for label, cfg, pol in runs:
        p = evaluate_setting(bundle, task, prompts, label, cfg, gen_length, batch_size, pol)
        points.append(p)
        if log is not None:
            log(p)
    return points


def frontier(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats in both accuracy (higher or equal) and NFE (lower or
    equal, one strictly better), by increasing NFE."""

    def beaten(p: Point) -> bool:
        return any(
            q.accuracy >= p.accuracy
            and q.nfe <= p.nfe
            and (q.accuracy > p.accuracy or q.nfe < p.nfe)
            for q in points
        )

    return sorted((p for p in points if not beaten(p)), key=lambda p: p.nfe)


def table(points: Sequence[Point]) -> str:
    """A markdown table (frontier points in bold label)."""
    front = {id(p) for p in frontier(points)}
    lines = [
        "| setting | accuracy | 95% interval | mean NFE | n | s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in points:
        line = p.row()
        if id(p) in front:
            line = line.replace(f"| {p.label} |", f"| **{p.label}** |", 1)
        lines.append(line)
    return "\n".join(lines)


def to_json(points: Sequence[Point], meta: dict) -> str:
    return json.dumps({**meta, "points": [asdict(p) for p in points]}, indent=1)
