"""Batched masked-diffusion sampling over any ``logits_fn(tokens [B, L]) -> logits [B, L, V]``.

A buffer holds MASK at the positions to generate. They are filled block by block (blocks of
``block_length`` consecutive masked positions per sample, semi-autoregressive; ``None`` = one
block, full diffusion). Per step, for each sample still generating:

1. logits of the buffer (with classifier-free guidance, also of the buffer with its condition
   positions replaced by MASK: ``l = l_u + (1 + s) (l_c - l_u)``, LLaDA's form; 2 NFE);
2. restricted to each position's modality range, optionally top-k / top-p filtered;
3. a token drawn per position: argmax at temperature 0, else from ``softmax(l / T)`` by
   inverse-CDF sampling in float64 with one uniform per position from the sample's own
   generator (the same distribution as Gumbel-max; batched == one-by-one);
4. scores (probability of the drawn token, margin p1 - p2, entropy) -> a strategy
   (:mod:`megadiff.diffusion.strategies`) picks the positions to commit.

Count strategies run a fixed number of steps (``steps`` split evenly over blocks, tokens per step
by LLaDA's schedule); adaptive ones stop when the block is filled, with ``steps`` as an optional
cap. Finished samples leave the forward batch; NFE is counted per sample.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from megadiff.diffusion.kernels import (
    filter_logits,
    inverse_cdf,
    row_max,
    row_view,
    softmax_,
    uniforms,
)
from megadiff.diffusion.objective import restrict_to_modality
from megadiff.diffusion.strategies import (
    ADAPTIVE_STRATEGIES,
    COUNT_STRATEGIES,
    STRATEGIES,
    PolicyFn,
    StepScores,
    select,
)

LogitsFn = Callable[..., Tensor]
"""``logits_fn(tokens [B, L]) -> logits [B, L, V]``. One that also takes ``positions``
(``[B, P]``) and ``columns`` (``(lo, hi)``) keyword arguments and then returns only those
logits, ``[B, P, hi - lo]`` as a tensor the sampler may modify, is asked for just the
candidates' logits in the columns of their modality range (the model skips the rest of its
output layer; :func:`megadiff.generation.adapters.reference_logits_fn` is one)."""


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

    def validate(self) -> SamplerConfig:
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
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SampleOutput:
    tokens: Tensor  # [B, L] the filled buffer
    nfe: Tensor  # [B] forward passes spent on each sample (a CFG step costs 2)
    steps: Tensor  # [B] sampler steps of each sample
    seconds: float  # wall time of the whole call
    model_seconds: float  # time inside logits_fn


def _candidate_logits(
    cols: Tensor,
    at: Tensor | None,
    uncond: int,
    mod: Tensor | None,
    ranges: Tensor,
    lo: int,
    cfg,
    shape: tuple[int, ...] = (),
) -> Tensor:
    """The sampling logits ``[*at.shape, n]`` of the rows ``at`` of ``cols`` (``[rows, n]``,
    columns ``lo:lo + n``): guided by the rows ``uncond`` further on under CFG, restricted to
    each position's range where ``mod`` is given, top-k/top-p filtered. A fresh CPU tensor;
    ``at=None``: the first ``prod(shape)`` rows of ``cols`` (which the sampler owns: modified in
    place, no copy)."""
    if at is None:
        lw = cols[: math.prod(shape)].view(*shape, -1)
        if cfg.cfg_scale > 0:
            lu = cols[uncond : uncond + math.prod(shape)].view(*shape, -1)
    else:
        shape = (*at.shape, cols.shape[-1])
        idx = at.reshape(-1).to(cols.device)
        lw = cols.index_select(0, idx).view(shape).cpu()  # one row copy each
        if cfg.cfg_scale > 0:
            lu = cols.index_select(0, idx + uncond).view(shape).cpu()
    if cfg.cfg_scale > 0:  # l_u + (1 + s) (l_c - l_u), in place
        lw.sub_(lu).mul_(1.0 + cfg.cfg_scale).add_(lu)
    if mod is not None:
        lw = restrict_to_modality(lw, mod, ranges, col_offset=lo)
    return filter_logits(lw, cfg.top_k, cfg.top_p, inplace=True)


def _takes_positions(logits_fn: LogitsFn) -> bool:
    """Whether ``logits_fn`` accepts ``positions=`` and ``columns=`` (see :data:`LogitsFn`)."""
    try:
        params = inspect.signature(logits_fn).parameters
    except (TypeError, ValueError):  # builtins, some C callables
        return False
    return "positions" in params and "columns" in params


def _masked_order(tokens: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """Positions of the masked tokens per row, in order ``[B, Mmax]`` (padded with 0), counts."""
    masked = tokens == mask_id
    n = masked.sum(1)
    L = tokens.shape[1]
    key = torch.where(masked, torch.arange(L), L + torch.arange(L))
    order = key.argsort(1)[:, : int(n.max()) if len(n) else 0]
    return order, n


def _draw(lw: Tensor, temperature: float, u: Tensor, prob: Tensor | None = None) -> Tensor:
    """One token per candidate from ``softmax(lw / T)`` by inverse-CDF sampling.

    ``lw``: ``[Ba, NC, n]`` candidate logits (``-inf`` outside a position's range); ``u``:
    ``[Ba, NC]`` float64 uniforms, each sample's from its own generator, so what it draws does
    not depend on the rest of the batch. Equal in distribution to ``argmax(lw / T + Gumbel)`` at
    a fraction of the cost (one random number per position instead of one per column); the CDF
    is accumulated in float64, so tokens of tiny probability keep their share. ``prob``:
    ``softmax(lw)`` when already computed (reused at T = 1). Overwrites ``lw`` otherwise.
    """
    if prob is not None and temperature == 1.0:
        w = prob
    else:  # exp((l - max l) / T), in place: 0 outside the range
        w = lw.sub_(lw.amax(-1, keepdim=True)).div_(temperature).exp_()
    return inverse_cdf(w, u)


@dataclass
class _Window:
    """What one step needs about the active samples' current blocks (fixed within a block)."""

    active: Tensor  # [Ba] sample ids
    cur: Tensor  # [Ba] their current block
    widx: Tensor  # [Ba, W] buffer positions of the block window (0 where not valid)
    valid: Tensor  # [Ba, W] window slot holds a position of the block
    wmod: Tensor  # [Ba, W] sampling modality row of each window position
    rows: Tensor  # [Ba, 1] 0..Ba-1
    lo: int  # logit columns lo:hi cover every window position's range
    hi: int
    mixed: bool  # window positions with different ranges (restrict per position)
    size: Tensor  # [Ba] positions in the block
    s_blk: Tensor  # [Ba] step budget of the block
    gens: list[torch.Generator]  # the active samples' generators
    cond: Tensor | None  # [Ba, L] their CFG condition positions (None without CFG)

    @staticmethod
    def build(
        active, a_cur, bl, n_masked, n_blocks, order, modality, ranges, gens, cond, cfg
    ) -> _Window:
        a_bl, a_n = bl[active], n_masked[active]
        W = int(bl.max())
        jj = torch.arange(W)
        # the current block's window: ranks cur*bl + j, j < bl, of the masked positions
        r = a_cur[:, None] * a_bl[:, None] + jj[None, :]
        valid = (jj[None, :] < a_bl[:, None]) & (r < a_n[:, None])
        widx = order[active].gather(1, r.clamp(max=order.shape[1] - 1)) * valid
        wmod = modality[active].gather(1, widx)
        lo_r, hi_r = ranges[wmod.clamp(0, len(ranges) - 1)].unbind(-1)
        lo = int(lo_r.masked_fill(~valid, 1 << 62).min())
        hi = int(hi_r.masked_fill(~valid, -1).max())
        mixed = bool(((lo_r != lo) | (hi_r != hi))[valid].any())
        size = torch.minimum(a_bl, a_n - a_cur * a_bl)
        nb = n_blocks[active]
        if cfg.steps is None:
            s_blk = size  # no cap: at most one step per token
        else:
            s_blk = (cfg.steps // nb + (a_cur < cfg.steps % nb).long()).clamp(min=1)
        rows = torch.arange(len(active))[:, None]
        a_gens = [gens[b] for b in active.tolist()]
        a_cond = cond[active] if cfg.cfg_scale > 0 else None
        return _Window(
            active, a_cur, widx, valid, wmod, rows, lo, hi, mixed, size, s_blk, a_gens, a_cond
        )


@torch.no_grad()
def sample(
    logits_fn: LogitsFn,
    tokens: Tensor,
    modality: Tensor,
    ranges: Tensor,
    mask_id: int,
    cfg: SamplerConfig,
    cond: Tensor | None = None,
    seeds: Sequence[int] | None = None,
    policy: PolicyFn | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SampleOutput:
    """Fill the MASK positions of ``tokens`` ``[B, L]``.

    ``modality``: ``[B, L]`` modality id per position (``ranges`` row); ``ranges``: ``[M, 2]``
    logit range per modality id (``VocabLayout.ranges_array()``); ``cond``: ``[B, L]`` bool,
    positions replaced by MASK for the unconditional CFG pass (default: every non-MASK
    position); ``seeds``: one per sample (default ``0..B-1``); ``progress(step, active)``.
    """
    cfg.validate()
    if cfg.strategy == "policy" and policy is None:
        raise SamplingError("strategy 'policy' needs a policy callable")
    t_start = time.perf_counter()
    tokens = tokens.detach().cpu().clone().long()
    modality = modality.detach().cpu().long()
    ranges = torch.as_tensor(ranges).long()
    B, L = tokens.shape
    if modality.shape != tokens.shape:
        raise SamplingError(f"modality shape {tuple(modality.shape)} != tokens {(B, L)}")
    if cond is None:
        cond = tokens != mask_id
    seeds = list(range(B)) if seeds is None else list(seeds)
    if len(seeds) != B:
        raise SamplingError(f"{len(seeds)} seeds for {B} samples")
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    order, n_masked = _masked_order(tokens, mask_id)
    full = cfg.block_length is None
    bl = (n_masked.clone() if full else torch.full_like(n_masked, cfg.block_length)).clamp(min=1)
    n_blocks = (n_masked + bl - 1) // bl
    W = int(bl.max()) if B else 0
    cur = torch.zeros(B, dtype=torch.long)  # current block
    sib = torch.zeros(B, dtype=torch.long)  # step inside the block
    nfe = torch.zeros(B, dtype=torch.long)
    steps = torch.zeros(B, dtype=torch.long)
    adaptive = cfg.strategy in ADAPTIVE_STRATEGIES
    jj = torch.arange(W)
    at_positions = _takes_positions(logits_fn)
    model_s = 0.0
    step_no = 0

    win = None  # per-window state, rebuilt when the active samples or their blocks change
    while True:
        active = (cur < n_blocks).nonzero(as_tuple=True)[0]
        if len(active) == 0:
            break
        every = len(active) == B  # all samples still generating: no row selection needed
        a_cur = cur if every else cur[active]
        if win is None or not (torch.equal(active, win.active) and torch.equal(a_cur, win.cur)):
            win = _Window.build(
                active, a_cur, bl, n_masked, n_blocks, order, modality, ranges, gens, cond, cfg
            )
        x = tokens if every else tokens[active]
        cand = win.valid & (x.gather(1, win.widx) == mask_id)
        # the candidates, compacted to [Ba, NC]
        nc = cand.sum(1)
        NC = int(nc.max())
        cidx = torch.where(cand, jj, W + jj).argsort(1)[:, :NC]
        cval = torch.arange(NC)[None, :] < nc[:, None]
        pos = win.widx.gather(1, cidx)  # padding slots: some other position of the window
        lo, hi = win.lo, win.hi

        # ---- model: logits of the candidates (all positions where logits_fn cannot restrict)
        inp = torch.cat([x, x.masked_fill(win.cond, mask_id)]) if cfg.cfg_scale > 0 else x
        t0 = time.perf_counter()
        if at_positions:
            at = torch.cat([pos, pos]) if cfg.cfg_scale > 0 else pos
            logits = logits_fn(inp, positions=at, columns=(lo, hi))  # [Ba(x2), NC, hi - lo]
        else:
            logits = logits_fn(inp)  # guidance is applied below, on the candidates' rows only
        model_s += time.perf_counter() - t0
        if every:
            nfe += 2 if cfg.cfg_scale > 0 else 1
            steps += 1
        else:
            nfe[active] += 2 if cfg.cfg_scale > 0 else 1
            steps[active] += 1
        step_no += 1

        # ---- scores, on the candidates only
        if at_positions:
            if logits.shape != (len(inp), NC, hi - lo):
                raise SamplingError(
                    f"logits_fn(positions=[{len(inp)}, {NC}], columns=({lo}, {hi})) returned "
                    f"shape {tuple(logits.shape)}, expected {(len(inp), NC, hi - lo)}"
                )
            cols = logits.reshape(-1, hi - lo).cpu()
            flat, step_b = win.rows * NC + torch.arange(NC), NC
        else:
            rows2d, step_b, step_l = row_view(logits)
            cols = rows2d[:, lo:hi]
            flat = win.rows * step_b + pos * step_l  # [Ba, NC] rows of the candidates in cols
        wmod = win.wmod.gather(1, cidx) if win.mixed else None
        n_u = (cfg.temperature > 0) + (cfg.strategy == "random")
        u = uniforms(nc, n_u, win.gens) if n_u else None

        # ---- how many to commit (exact count, or the minimum that meets the step cap)
        i = sib if every else sib[active]
        s_blk, c = win.s_blk, win.size
        if adaptive:
            k = (-(-nc // (s_blk - i).clamp(min=1))).clamp(min=1)
        else:
            k = c // s_blk + (i < c % s_blk).long()
            k = torch.where(i >= s_blk - 1, nc, k)  # the last step fills the block

        uncond = len(active) * step_b  # CFG: the unconditional rows follow the conditional
        if cfg.strategy == "random":  # the choice needs no logits: read the committed ones only
            uni = u[-1].float()
            chosen = select("random", StepScores(cval, uni, uni, uni, uni, None), k) & cval
            bi, ji = chosen.nonzero(as_tuple=True)
            wm = None if wmod is None else wmod[bi, ji]
            lw = _candidate_logits(cols, flat[bi, ji], uncond, wm, ranges, lo, cfg)
            if cfg.temperature > 0:  # the uniform each candidate would have drawn with
                x[bi, pos[bi, ji]] = lo + _draw(lw, cfg.temperature, u[0][bi, ji])
            else:
                x[bi, pos[bi, ji]] = lo + lw.argmax(-1)
        else:
            at = None if at_positions else flat  # the model's output holds just these rows
            lw = _candidate_logits(cols, at, uncond, wmod, ranges, lo, cfg, (len(active), NC))
            # probabilities in one fused pass (confidence etc. read from them, as LLaDA's),
            # over lw itself where nothing reads the logits again
            entropy = None
            if cfg.strategy == "entropy":  # H = log Z - sum p (l - max l), log Z = -log max p
                lmax = lw.amax(-1)
                prob = lw.softmax(-1)
                plogit = torch.linalg.vecdot(prob, lw)  # one fused pass
                if plogit.isnan().any():  # 0 * -inf outside a position's range: skip those
                    plogit = (prob * lw).nansum(-1)
                pmax = prob.amax(-1)
                entropy = (lmax - plogit - pmax.log()).clamp_(min=0.0)
            else:
                prob = softmax_(lw) if cfg.temperature in (0.0, 1.0) else lw.softmax(-1)
            x0 = None  # [Ba, NC] the token of each candidate
            if cfg.temperature > 0:
                x0 = lo + _draw(lw, cfg.temperature, u[0], prob)  # overwrites lw
                conf = prob.gather(-1, (x0 - lo)[..., None]).squeeze(-1)
            else:  # greedy: the probabilities now (a fast reduction), argmax of the committed only
                conf = pmax if cfg.strategy == "entropy" else prob.amax(-1)
            margin, entropy = conf, conf if entropy is None else entropy
            if cfg.strategy == "margin":  # p1 - p2: the row maximum, then the maximum without it
                p1, i1 = row_max(prob)
                prob.scatter_(-1, i1[..., None], -1.0)
                margin = p1 - prob.amax(-1)
                prob.scatter_(-1, i1[..., None], p1[..., None])
            if cfg.strategy == "policy":  # the policy sees the whole block window
                frac = i.double() / s_blk.double()
                conf_w = torch.ones(len(active), W, dtype=conf.dtype).scatter(1, cidx, conf)
                sc = StepScores(cand, conf_w, conf_w, conf_w, conf_w, frac)
                chosen = select("policy", sc, k, policy=policy).gather(1, cidx) & cval
            else:
                sc = StepScores(cval, conf, margin, entropy, conf, None)
                chosen = select(cfg.strategy, sc, k, cfg.threshold, cfg.entropy_bound) & cval
            # ---- commit
            bi, ji = chosen.nonzero(as_tuple=True)
            x[bi, pos[bi, ji]] = lo + prob[bi, ji].argmax(-1) if x0 is None else x0[bi, ji]
        done = chosen.sum(1) == nc
        if every:  # x is tokens itself
            sib = torch.where(done, 0, i + 1)
            cur = a_cur + done.long()
        else:
            tokens[active] = x
            sib[active] = torch.where(done, 0, i + 1)
            cur[active] = a_cur + done.long()
        if progress is not None:
            progress(step_no, len(active))

    return SampleOutput(tokens, nfe, steps, time.perf_counter() - t_start, model_s)
