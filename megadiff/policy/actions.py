"""Actions of the unmasking policy over the candidates (masked positions of the current block).

An action is a ``rank`` tensor ``[B, L]`` (long): ``-1`` where a position is not unmasked, else
its rank in the action (``0`` for every chosen position of a Bernoulli action; ``0, 1, ...`` in
the drawn order for Dynamic Plackett-Luce). Modes:

* ``bernoulli``: each candidate independently with probability ``sigmoid(b / tau)``; an empty
  action is allowed (it costs a step and unmasks nothing);
* ``bernoulli-argmax``: the same, but an empty action commits the candidate with the largest
  policy logit instead (test time: the reference recipe's rule);
* ``dpls``: a forced first choice from ``softmax(b / tau)`` over the candidates, then a Gumbel
  ranking of the others against a STOP logit, cut at STOP (never empty).

Log-likelihoods sum over the candidates only.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

MODES = ("bernoulli", "bernoulli-argmax", "dpls")


def draw_uniforms(generators: list[torch.Generator], width: int, k: int = 1) -> Tensor:
    """``[k, B, width]`` float64 uniforms, row ``b`` from ``generators[b]`` (batch-independent)."""
    u = torch.empty(k, len(generators), width, dtype=torch.float64)
    for b, gen in enumerate(generators):
        u[:, b] = torch.rand(k, width, generator=gen, dtype=torch.float64)
    return u


def gumbel(u: Tensor) -> Tensor:
    return -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))


def sample_bernoulli(logits: Tensor, candidate: Tensor, tau: float, uniform: Tensor) -> Tensor:
    """The ``rank`` of a Bernoulli action: candidate ``k`` chosen if ``u_k < sigmoid(b_k/tau)``."""
    p = torch.sigmoid(logits.double() / tau)
    chosen = (uniform < p) & candidate
    return torch.where(chosen, 0, -1)


def argmax_fallback(rank: Tensor, logits: Tensor, candidate: Tensor) -> Tensor:
    """Rows with an empty action (and a candidate) commit their largest-logit candidate."""
    empty = ((rank >= 0).sum(1) == 0) & candidate.any(1)
    best = logits.masked_fill(~candidate, float("-inf")).argmax(1)
    out = rank.clone()
    rows = empty.nonzero(as_tuple=True)[0]
    out[rows, best[rows]] = 0
    return out


def bernoulli_log_prob(logits: Tensor, rank: Tensor, candidate: Tensor, tau: float) -> Tensor:
    """``[B]`` log-likelihood ``sum_k u_k log s_k + (1 - u_k) log(1 - s_k)`` over candidates."""
    z = logits / tau
    lp = torch.where(rank >= 0, F.logsigmoid(z), F.logsigmoid(-z))
    return (lp * candidate).sum(1)


def bernoulli_entropy(logits: Tensor, candidate: Tensor, tau: float) -> Tensor:
    """``[B]`` mean Bernoulli entropy (nats) per candidate (0 without candidates)."""
    z = logits / tau
    p = torch.sigmoid(z)
    h = -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))
    n = candidate.sum(1)
    return (h * candidate).sum(1) / n.clamp(min=1)


def sample_dpls(
    logits: Tensor, candidate: Tensor, tau: float, stop_logit: float, uniform: Tensor
) -> Tensor:
    """The ``rank`` of a Dynamic Plackett-Luce action. ``uniform``: ``[2, B, L + 1]`` (the
    first choice's Gumbels, then the ranking's; column ``L`` is STOP's)."""
    z = logits.double() / tau
    B, L = z.shape
    neg = torch.tensor(float("-inf"), dtype=z.dtype)
    first_key = torch.where(candidate, z + gumbel(uniform[0, :, :L]), neg)
    first = first_key.argmax(1)
    rest = candidate.clone()
    rest[torch.arange(B), first] = False
    key = torch.where(rest, z + gumbel(uniform[1, :, :L]), neg)
    stop_key = stop_logit / tau + gumbel(uniform[1, :, L])
    chosen = rest & (key > stop_key[:, None])
    # rank among the chosen by descending key: 1, 2, ... after the forced first choice
    order = key.masked_fill(~chosen, float("-inf")).argsort(dim=1, descending=True, stable=True)
    pos_rank = torch.empty_like(order)
    pos_rank.scatter_(1, order, torch.arange(L).expand(B, L))
    rank = torch.where(chosen, pos_rank + 1, -1)
    has = candidate.any(1)
    rank[torch.arange(B)[has], first[has]] = 0
    return rank


def dpls_log_prob(
    logits: Tensor, rank: Tensor, candidate: Tensor, tau: float, stop_logit: float
) -> Tensor:
    """``[B]`` Plackett-Luce log-likelihood of the drawn order: the first choice from the
    softmax over the candidates, each next one from the candidates left plus STOP, then STOP."""
    z = (logits / tau).masked_fill(~candidate, float("-inf"))
    B, L = z.shape
    n = (rank >= 0).sum(1)  # chosen per row
    stop = torch.full((B, 1), stop_logit / tau, dtype=z.dtype)
    picked = torch.where(rank >= 0, z, torch.zeros_like(z)).sum(1)  # sum of the chosen logits
    lp = picked - torch.logsumexp(z, 1)
    steps = int(n.max()) if B else 0
    for j in range(1, steps + 1):  # denominator of choice j (or of STOP after n - 1 choices)
        left = candidate & ((rank >= j) | (rank < 0))
        denom = torch.logsumexp(torch.cat([z.masked_fill(~left, float("-inf")), stop], 1), 1)
        lp = lp - torch.where(j <= n, denom, torch.zeros_like(denom))
    lp = lp + torch.where(n > 0, stop[:, 0], torch.zeros_like(lp))
    return torch.where(candidate.any(1), lp, torch.zeros_like(lp))


def sample_action(
    mode: str,
    logits: Tensor,
    candidate: Tensor,
    tau: float,
    generators: list[torch.Generator],
    stop_logit: float = 0.0,
) -> Tensor:
    """The ``rank`` of an action of ``mode`` (draws from each row's generator)."""
    L = logits.shape[1]
    if mode == "dpls":
        u = draw_uniforms(generators, L + 1, 2)
        return sample_dpls(logits, candidate, tau, stop_logit, u)
    if mode not in MODES:
        raise ValueError(f"unknown action mode '{mode}' (known: {', '.join(MODES)})")
    rank = sample_bernoulli(logits, candidate, tau, draw_uniforms(generators, L)[0])
    return argmax_fallback(rank, logits, candidate) if mode == "bernoulli-argmax" else rank


def action_log_prob(
    mode: str, logits: Tensor, rank: Tensor, candidate: Tensor, tau: float, stop_logit: float = 0.0
) -> Tensor:
    """``[B]`` log-likelihood of the actions ``rank`` under ``logits`` (both Bernoulli modes:
    the Bernoulli likelihood of the committed set)."""
    if mode == "dpls":
        return dpls_log_prob(logits, rank, candidate, tau, stop_logit)
    return bernoulli_log_prob(logits, rank, candidate, tau)
