"""One sampler step on its candidates: their sampling logits, token draws, scores, and the commit.

The candidates are the still-masked positions of each active sample's current block, compacted
to ``[Ba, NC]`` (``Ba`` active samples, ``NC`` the most candidates any of them has; the other
slots are padding). Per step:

1. the candidates' sampling logits: read from the model's output (:class:`CandidateLogits`),
   guided under CFG, restricted to each position's modality range, top-k / top-p filtered;
2. a token per candidate: argmax at temperature 0, else drawn by inverse CDF (:func:`draw`);
3. the :class:`~megadiff.diffusion.strategies.StepScores` of the strategy: probability of the
   token (confidence), margin p1 - p2, entropy;
4. the strategy's commit mask (:func:`~megadiff.diffusion.strategies.select`), and the chosen
   tokens written into the buffer.

``random`` needs no scores: it chooses first and reads only the chosen candidates' logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from megadiff.diffusion.kernels import filter_logits, inverse_cdf, row_max, softmax_
from megadiff.diffusion.objective import restrict_to_modality
from megadiff.diffusion.strategies import (
    TOPK_FEATURES,
    PolicyFn,
    PolicyObservation,
    StepScores,
    select,
)

if TYPE_CHECKING:
    from megadiff.diffusion.sampler_config import SamplerConfig


@dataclass
class Candidates:
    """The positions a step decides on, compacted to ``[Ba, NC]`` from the ``[Ba, W]`` window."""

    in_window: Tensor  # [Ba, W] bool: the window slot holds a candidate
    slot: Tensor  # [Ba, NC] window slot of each candidate (in position order)
    valid: Tensor  # [Ba, NC] bool: a candidate, not padding
    count: Tensor  # [Ba] candidates per sample
    position: Tensor  # [Ba, NC] buffer position (padding: some other position of the window)

    @staticmethod
    def find(
        buffer: Tensor, window_positions: Tensor, in_block: Tensor, mask_id: int
    ) -> Candidates:
        """The still-masked slots of the window (``window_positions`` ``[Ba, W]``, of which
        ``in_block`` lie in the block) of ``buffer`` ``[Ba, L]``."""
        width = window_positions.shape[1]
        slots = torch.arange(width)
        in_window = in_block & (buffer.gather(1, window_positions) == mask_id)
        count = in_window.sum(1)
        most = int(count.max())  # NC
        slot = torch.where(in_window, slots, width + slots).argsort(1)[:, :most]
        valid = torch.arange(most)[None, :] < count[:, None]
        return Candidates(in_window, slot, valid, count, window_positions.gather(1, slot))


@dataclass
class CandidateLogits:
    """Where the candidates' logits are in the model's output, read as the rows of a 2-D table."""

    table: Tensor  # [rows, hi - lo] the output's logits in the columns lo:hi
    rows: Tensor  # [Ba, NC] each candidate's row in table (the conditional pass)
    uncond_offset: int  # CFG: a candidate's unconditional row is its row + uncond_offset
    lo: int  # vocabulary id of table's first column
    modality: Tensor | None  # [Ba, NC] ranges row per candidate (None: all share lo:hi)
    ranges: Tensor  # [M, 2] logit range per modality id
    compact: bool  # table's first Ba * NC rows are the candidates, in order

    def sampling_logits(
        self, cfg: SamplerConfig, pick: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """The sampling logits ``[Ba, NC, n]`` of every candidate, or ``[len(pick[0]), n]`` of
        the candidates ``pick`` (sample, candidate indices): guided under CFG, restricted to each
        position's range where ranges differ, top-k/top-p filtered. A CPU tensor the caller may
        overwrite: the table's own rows (no copy) when compact and every candidate is read."""
        guided = cfg.cfg_scale > 0
        modality = self.modality
        if pick is None and self.compact:
            shape = self.rows.shape
            n = math.prod(shape)
            logits = self.table[:n].view(*shape, -1)
            if guided:
                uncond = self.table[self.uncond_offset : self.uncond_offset + n].view(*shape, -1)
        else:
            at = self.rows if pick is None else self.rows[pick]
            if pick is not None and modality is not None:
                modality = modality[pick]
            shape = (*at.shape, self.table.shape[-1])
            idx = at.reshape(-1).to(self.table.device)
            logits = self.table.index_select(0, idx).view(shape).cpu()  # one row copy each
            if guided:
                uncond = self.table.index_select(0, idx + self.uncond_offset).view(shape).cpu()
        if guided:  # l_u + (1 + s) (l_c - l_u), in place
            logits.sub_(uncond).mul_(1.0 + cfg.cfg_scale).add_(uncond)
        if modality is not None:
            logits = restrict_to_modality(logits, modality, self.ranges, col_offset=self.lo)
        return filter_logits(logits, cfg.top_k, cfg.top_p, inplace=True)


@dataclass
class Step:
    """What one step knows about the active samples."""

    buffer: Tensor  # [Ba, L] their tokens; the committed ones are written here
    candidates: Candidates
    logits: CandidateLogits
    n_commit: Tensor  # [Ba] positions to commit (count strategies) or the minimum (adaptive)
    uniforms: Tensor | None  # [k, Ba, NC]: [0] token draws (T > 0), [-1] the random choice
    observation: PolicyObservation | None = None  # strategy policy: what the policy sees
    gen_index: Tensor | None = None  # [Ba, NC] strategy policy: each candidate's column there


@dataclass
class CandidateScores:
    """A step's per-candidate quantities, ``[Ba, NC]`` each (``prob``: ``[Ba, NC, n]``)."""

    prob: Tensor  # softmax of the sampling logits
    token: Tensor | None  # the drawn token (T > 0); None: greedy, the argmax of prob
    confidence: Tensor  # probability of the token
    margin: Tensor  # p1 - p2 (strategy margin; else confidence)
    entropy: Tensor  # nats (strategy entropy; else confidence)


def commit(step: Step, cfg: SamplerConfig, policy: PolicyFn | None = None) -> Tensor:
    """Choose the candidates to commit by ``cfg.strategy`` and write their tokens into
    ``step.buffer``; returns the ``[Ba, NC]`` commit mask."""
    if cfg.strategy == "random":
        return _commit_random(step, cfg)
    lo = step.logits.lo
    token_uniforms = step.uniforms[0] if cfg.temperature > 0 else None
    scores = score(step.logits.sampling_logits(cfg), cfg, token_uniforms, lo)
    chosen = _choose(step, scores, cfg, policy)
    i, j = chosen.nonzero(as_tuple=True)
    position = step.candidates.position[i, j]
    if scores.token is None:
        step.buffer[i, position] = lo + scores.prob[i, j].argmax(-1)
    else:
        step.buffer[i, position] = scores.token[i, j]
    return chosen


def _commit_random(step: Step, cfg: SamplerConfig) -> Tensor:
    """``random``: the choice needs no logits; only the chosen candidates' are read."""
    valid = step.candidates.valid
    uniform = step.uniforms[-1].float()
    scores = StepScores(valid, uniform, uniform, uniform, uniform)
    chosen = select("random", scores, step.n_commit) & valid
    i, j = chosen.nonzero(as_tuple=True)
    logits = step.logits.sampling_logits(cfg, (i, j))
    if cfg.temperature > 0:  # the uniform each candidate would have drawn with
        token = draw(logits, cfg.temperature, step.uniforms[0][i, j])
    else:
        token = logits.argmax(-1)
    step.buffer[i, step.candidates.position[i, j]] = step.logits.lo + token
    return chosen


def score(
    logits: Tensor, cfg: SamplerConfig, token_uniforms: Tensor | None, lo: int
) -> CandidateScores:
    """Probabilities, token and scores of the candidates' sampling ``logits`` ``[Ba, NC, n]``
    (columns from vocabulary id ``lo``); may overwrite ``logits``.

    The probabilities come from one fused pass (confidence etc. read from them, as LLaDA's),
    written over ``logits`` where nothing reads the logits again.
    """
    entropy = None
    if cfg.strategy == "entropy":
        prob, p_max, entropy = _prob_and_entropy(logits)
    elif cfg.temperature in (0.0, 1.0):
        prob = softmax_(logits)
    else:
        prob = logits.softmax(-1)
    token = None
    if cfg.temperature > 0:
        token = lo + draw(logits, cfg.temperature, token_uniforms, prob)  # overwrites logits
        confidence = prob.gather(-1, (token - lo)[..., None]).squeeze(-1)
    else:  # greedy: the probabilities now (a fast reduction), argmax of the committed only
        confidence = p_max if cfg.strategy == "entropy" else prob.amax(-1)
    margin = _margin(prob) if cfg.strategy == "margin" else confidence
    entropy = confidence if entropy is None else entropy
    return CandidateScores(prob, token, confidence, margin, entropy)


def _prob_and_entropy(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``softmax(logits)``, its maximum and its entropy ``H = log Z - sum p (l - max l)``, with
    ``log Z = -log max p``."""
    l_max = logits.amax(-1)
    prob = logits.softmax(-1)
    p_logit = torch.linalg.vecdot(prob, logits)  # one fused pass
    if p_logit.isnan().any():  # 0 * -inf outside a position's range: skip those
        p_logit = (prob * logits).nansum(-1)
    p_max = prob.amax(-1)
    return prob, p_max, (l_max - p_logit - p_max.log()).clamp_(min=0.0)


def _margin(prob: Tensor) -> Tensor:
    """p1 - p2: the row maximum, then the maximum without it (``prob`` is restored)."""
    p1, i1 = row_max(prob)
    prob.scatter_(-1, i1[..., None], -1.0)
    margin = p1 - prob.amax(-1)
    prob.scatter_(-1, i1[..., None], p1[..., None])
    return margin


def _choose(
    step: Step, scores: CandidateScores, cfg: SamplerConfig, policy: PolicyFn | None
) -> Tensor:
    """The strategy's ``[Ba, NC]`` commit mask."""
    valid = step.candidates.valid
    if cfg.strategy == "policy":
        return _policy_choice(step, policy) & valid
    conf = scores.confidence
    compact = StepScores(valid, conf, scores.margin, scores.entropy, conf)
    return select(cfg.strategy, compact, step.n_commit, cfg.threshold, cfg.entropy_bound) & valid


def draw(
    logits: Tensor, temperature: float, uniforms: Tensor, prob: Tensor | None = None
) -> Tensor:
    """One token per candidate from ``softmax(logits / T)`` by inverse-CDF sampling.

    ``logits``: ``[Ba, NC, n]`` candidate logits (``-inf`` outside a position's range);
    ``uniforms``: ``[Ba, NC]`` float64, each sample's from its own generator, so what it draws
    does not depend on the rest of the batch. Equal in distribution to
    ``argmax(logits / T + Gumbel)`` at a fraction of the cost (one random number per position
    instead of one per column); the CDF is accumulated in float64, so tokens of tiny probability
    keep their share. ``prob``: ``softmax(logits)`` when already computed (reused at T = 1).
    Overwrites ``logits`` otherwise.
    """
    if prob is not None and temperature == 1.0:
        weights = prob
    else:  # exp((l - max l) / T), in place: 0 outside the range
        weights = logits.sub_(logits.amax(-1, keepdim=True)).div_(temperature).exp_()
    return inverse_cdf(weights, uniforms)


def _policy_choice(step: Step, policy: PolicyFn) -> Tensor:
    """The policy's action on the candidates; at the step cap's last step every candidate."""
    obs = step.observation
    out = policy(obs)
    if out.shape != obs.candidate.shape:
        raise ValueError(
            f"policy returned {tuple(out.shape)}, expected {tuple(obs.candidate.shape)}"
        )
    action = out if out.dtype == torch.bool else out > 0
    return action.gather(1, step.gen_index) | obs.last_step[:, None]


def policy_features(logits: Tensor, names: tuple[str, ...]) -> Tensor:
    """Per-position features ``[Ba, G, F]`` of sampling logits ``[Ba, G, n]`` (``-inf`` outside
    a position's range): top-1 probability (confidence), p1 - p2 (margin), entropy (nats),
    the :data:`TOPK_FEATURES` largest probabilities (topk); columns in the order of ``names``."""
    prob, p_max, entropy = _prob_and_entropy(logits)
    k = min(TOPK_FEATURES, prob.shape[-1])
    top = prob.topk(k, dim=-1).values
    if k < TOPK_FEATURES:
        top = torch.cat([top, top.new_zeros(*top.shape[:-1], TOPK_FEATURES - k)], -1)
    columns = {
        "confidence": p_max[..., None],
        "margin": (top[..., 0] - top[..., 1])[..., None],
        "entropy": entropy[..., None],
        "topk": top,
    }
    unknown = [n for n in names if n not in columns]
    if unknown:
        raise ValueError(f"unknown policy feature(s) {unknown} (known: {', '.join(columns)})")
    return torch.cat([columns[n] for n in names], -1).float()
