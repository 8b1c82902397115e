"""Unmasking strategies: which still-masked positions of the current block to commit this step.

Every strategy works on one window per sample (the positions of its current block, padded to a
common width ``W``) and returns a boolean ``[B, W]`` commit mask. Two kinds:

* **count** strategies (``random``, ``confidence``, ``margin``) commit exactly ``k[b]`` positions,
  ``k`` from LLaDA's tokens-per-step schedule (:func:`get_num_transfer_tokens`);
* **adaptive** strategies (``threshold``, ``entropy``, ``policy``) choose the set themselves and
  commit at least ``k_min[b]`` (>= 1) positions, so a step cap is always met.

A learned unmasking policy plugs in through :class:`PolicyFn`: it reads a
:class:`PolicyObservation` of the whole generation buffer (per-position features, mask bits, step
fraction) and returns the positions to commit; only the current block's candidates are
committed, and at the last step of a block's step cap every candidate left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

COUNT_STRATEGIES = ("random", "confidence", "margin")
ADAPTIVE_STRATEGIES = ("threshold", "entropy", "policy")
STRATEGIES = COUNT_STRATEGIES + ADAPTIVE_STRATEGIES


TOPK_FEATURES = 4  # feature "topk": the 4 largest probabilities, in decreasing order


@dataclass
class PolicyObservation:
    """What a policy sees at one step of the ``Ba`` active samples, over each sample's generated
    positions (its masked positions of the input buffer, in order; ``G`` the most of any)."""

    features: Tensor  # [Ba, G, F] the dLLM's per-position features (PolicyFn.features, in order)
    masked: Tensor  # [Ba, G] bool: still MASK
    candidate: Tensor  # [Ba, G] bool: masked and in the current block (what may be committed)
    pad: Tensor  # [Ba, G] bool: no position (the sample generates fewer than G)
    step_frac: Tensor  # [Ba] steps taken / the sample's step budget (steps, or its positions)
    last_step: Tensor  # [Ba] bool: the block's step cap is reached; every candidate is committed
    generators: list[torch.Generator]  # each active sample's own (draws independent of batch)
    sample_ids: Tensor  # [Ba] each row's index in the batch given to the sampler


class PolicyFn(Protocol):
    """``observation -> [Ba, G]`` bools (or logits: commit where > 0); candidates only are
    committed. An optional ``features`` attribute names the feature columns it reads
    (``confidence``, ``margin``, ``entropy``, ``topk``; default ``("confidence",)``)."""

    def __call__(self, observation: PolicyObservation) -> Tensor: ...


@dataclass
class StepScores:
    """Per-window-position quantities a strategy may read (``[B, W]`` each)."""

    candidate: Tensor  # bool: still masked and inside the current block
    confidence: Tensor  # probability of the sampled token
    margin: Tensor  # p1 - p2 of the restricted distribution
    entropy: Tensor  # entropy (nats) of the restricted distribution
    uniform: Tensor  # per-sample uniform draws (for ``random``)


def get_num_transfer_tokens(mask_count: Tensor, steps: int) -> Tensor:
    """LLaDA's schedule: ``[B] -> [B, steps]``; the count split evenly, remainder first."""
    base = mask_count // steps
    rem = mask_count % steps
    out = base[:, None].repeat(1, steps)
    out += (torch.arange(steps, device=mask_count.device)[None, :] < rem[:, None]).long()
    return out


def _top_k(score: Tensor, candidate: Tensor, k: Tensor) -> Tensor:
    """Commit the ``k[b]`` candidates with the highest score in each row."""
    score = score.masked_fill(~candidate, float("-inf"))
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    k = torch.minimum(k, candidate.sum(1))
    return (rank < k[:, None]) & candidate


def select(
    strategy: str, s: StepScores, k: Tensor, threshold: float = 0.9, entropy_bound: float = 0.1
) -> Tensor:
    """The ``[B, W]`` commit mask of a heuristic ``strategy`` (``policy``: see
    :class:`PolicyFn`).

    ``k``: ``[B]`` positions to commit (count strategies) or the minimum to commit (adaptive).
    """
    cand = s.candidate
    if strategy == "confidence":
        return _top_k(s.confidence, cand, k)
    if strategy == "margin":
        return _top_k(s.margin, cand, k)
    if strategy == "random":
        return _top_k(s.uniform, cand, k)
    if strategy == "threshold":  # Fast-dLLM: every candidate with confidence >= tau
        chosen = cand & (s.confidence >= threshold)
        return chosen | _top_k(s.confidence, cand, k)
    if strategy == "entropy":  # EB-sampler: largest low-entropy prefix with sum(H) - max(H) <= g
        h = s.entropy.masked_fill(~cand, float("inf"))
        order = h.argsort(dim=1, stable=True)
        hs = h.gather(1, order).masked_fill(~cand.gather(1, order), 0.0)
        ok = (hs.cumsum(1) - hs.cummax(1).values) <= entropy_bound
        ok &= cand.gather(1, order)
        ok = ok.long().cumprod(1).bool()  # a prefix
        chosen = torch.zeros_like(cand).scatter(1, order, ok)
        return chosen | _top_k(-s.entropy, cand, k)
    raise ValueError(f"unknown heuristic strategy '{strategy}' (known: {', '.join(STRATEGIES)})")
