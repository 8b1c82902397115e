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

With ``cache`` ``prefix`` or ``dual`` (blocks only) the model runs the whole buffer at each
block's first step and keeps its keys/values, then only a span of the buffer at the block's other
steps (:mod:`megadiff.diffusion.block_cache`: approximate; ``none`` is exact).

This module holds the loop and the block bookkeeping; steps 2-4, on a step's candidates, are in
:mod:`megadiff.diffusion.step_scores`, the CPU kernels they use in
:mod:`megadiff.diffusion.kernels`.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from megadiff.diffusion.block_cache import BlockCache, CacheCall
from megadiff.diffusion.kernels import row_view, uniforms
from megadiff.diffusion.sampler_config import SamplerConfig, SamplingError
from megadiff.diffusion.step_scores import (
    CandidateLogits,
    Candidates,
    Step,
    commit,
    policy_features,
)
from megadiff.diffusion.strategies import ADAPTIVE_STRATEGIES, PolicyFn, PolicyObservation

LogitsFn = Callable[..., Tensor]
"""``logits_fn(tokens [B, L]) -> logits [B, L, V]``. One that also takes ``positions``
(``[B, P]``) and ``columns`` (``(lo, hi)``) keyword arguments and then returns only those
logits, ``[B, P, hi - lo]`` as a tensor the sampler may modify, is asked for just the
candidates' logits in the columns of their modality range (the model skips the rest of its
output layer; :func:`megadiff.generation.adapters.reference_logits_fn` is one). One that also
takes ``cache`` (a :class:`~megadiff.diffusion.block_cache.CacheCall`) serves the block KV
caches."""


@dataclass
class SampleOutput:
    tokens: Tensor  # [B, L] the filled buffer
    nfe: Tensor  # [B] forward passes spent on each sample (a CFG step costs 2)
    steps: Tensor  # [B] sampler steps of each sample
    seconds: float  # wall time of the whole call
    model_seconds: float  # time inside logits_fn


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
    start = time.perf_counter()
    tokens, inputs = _checked_inputs(tokens, modality, ranges, mask_id, cond, seeds)
    blocks = _Blocks.of(tokens, mask_id, cfg.block_length)
    counters = _Counters.zeros(len(tokens))
    model = _Model(logits_fn, mask_id, cfg.cfg_scale)
    if cfg.cache != "none":
        model.use_cache(cfg.cache, blocks)
    window = None  # rebuilt when the active samples or their blocks change
    step_no = 0
    while True:
        active = (counters.block < blocks.count).nonzero(as_tuple=True)[0]
        if len(active) == 0:
            break
        everyone = len(active) == len(tokens)  # all samples still generating: no row selection
        block = counters.block if everyone else counters.block[active]
        if window is None or not window.covers(active, block):
            window = _Window.build(blocks, inputs, active, block, cfg)
        buffer = tokens if everyone else tokens[active]
        step_in_block = counters.step_in_block if everyone else counters.step_in_block[active]
        steps_taken = counters.steps if everyone else counters.steps[active]
        block_done = _step(model, buffer, window, step_in_block, steps_taken, cfg, policy)
        if not everyone:
            tokens[active] = buffer
        counters.advance(active, everyone, block, step_in_block, block_done, model.nfe_per_step)
        step_no += 1
        if progress is not None:
            progress(step_no, len(active))
    seconds = time.perf_counter() - start
    return SampleOutput(tokens, counters.nfe, counters.steps, seconds, model.seconds)


def _step(
    model: _Model,
    buffer: Tensor,
    window: _Window,
    step_in_block: Tensor,
    steps_taken: Tensor,
    cfg: SamplerConfig,
    policy: PolicyFn | None,
) -> Tensor:
    """One step of the active samples (``buffer`` ``[Ba, L]``, their tokens: the committed ones
    are written into it); returns ``[Ba]`` whether each sample's block is now filled."""
    candidates = Candidates.find(buffer, window.positions, window.in_block, model.mask_id)
    n_uniforms = (cfg.temperature > 0) + (cfg.strategy == "random")
    draws = uniforms(candidates.count, n_uniforms, window.generators) if n_uniforms else None
    adaptive = cfg.strategy in ADAPTIVE_STRATEGIES
    n_commit = window.commit_count(step_in_block, candidates.count, adaptive)
    if cfg.strategy == "policy":
        gen = window.generation
        gen_index = gen.index_of(window, candidates)
        logits, everywhere = model.generation_logits(buffer, window, candidates, gen_index)
        names = getattr(policy, "features", ("confidence",))
        observation = gen.observe(
            buffer, window, model.mask_id, policy_features(everywhere.sampling_logits(cfg), names)
        )
        observation.step_frac = steps_taken.double() / gen.total_budget.double()
        observation.last_step = step_in_block >= window.step_budget - 1
        step = Step(buffer, candidates, logits, n_commit, draws, observation, gen_index)
    else:
        logits = model.candidate_logits(buffer, window, candidates, step_in_block == 0)
        step = Step(buffer, candidates, logits, n_commit, draws)
    chosen = commit(step, cfg, policy)
    return chosen.sum(1) == candidates.count


def _checked_inputs(
    tokens: Tensor,
    modality: Tensor,
    ranges: Tensor,
    mask_id: int,
    cond: Tensor | None,
    seeds: Sequence[int] | None,
) -> tuple[Tensor, _Inputs]:
    """The buffer as a fresh CPU long tensor (the sampler fills it in place), and the rest."""
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
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return tokens, _Inputs(modality, ranges, cond, generators)


@dataclass
class _Inputs:
    """The samples' fixed inputs besides the buffer."""

    modality: Tensor  # [B, L] ranges row of each position
    ranges: Tensor  # [M, 2] logit range per modality id
    cond: Tensor  # [B, L] bool: positions replaced by MASK for the unconditional CFG pass
    generators: list[torch.Generator]  # one per sample


@dataclass
class _Blocks:
    """Each sample's masked positions in order, cut into blocks (fixed for the whole call)."""

    order: Tensor  # [B, Mmax] buffer positions of the masked tokens, in order (padded with 0)
    n_masked: Tensor  # [B]
    length: Tensor  # [B] block length (>= 1)
    count: Tensor  # [B] blocks

    @staticmethod
    def of(tokens: Tensor, mask_id: int, block_length: int | None) -> _Blocks:
        """``block_length`` None: one block of every masked position."""
        order, n_masked = _masked_order(tokens, mask_id)
        if block_length is None:
            length = n_masked.clone()
        else:
            length = torch.full_like(n_masked, block_length)
        length = length.clamp(min=1)
        return _Blocks(order, n_masked, length, (n_masked + length - 1) // length)


def _masked_order(tokens: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """Positions of the masked tokens per row, in order ``[B, Mmax]`` (padded with 0), counts."""
    masked = tokens == mask_id
    n = masked.sum(1)
    L = tokens.shape[1]
    key = torch.where(masked, torch.arange(L), L + torch.arange(L))
    order = key.argsort(1)[:, : int(n.max()) if len(n) else 0]
    return order, n


@dataclass
class _Window:
    """The active samples' current blocks as a ``[Ba, W]`` window of slots (``W``: the longest
    block), and what a step needs about them (fixed within a block)."""

    active: Tensor  # [Ba] sample ids
    block: Tensor  # [Ba] their current block
    positions: Tensor  # [Ba, W] buffer position of each slot (0 where not in the block)
    in_block: Tensor  # [Ba, W] bool: the slot holds a position of the block
    modality: Tensor  # [Ba, W] ranges row of each slot's position
    ranges: Tensor  # [M, 2]
    lo: int  # logit columns lo:hi cover every slot's range
    hi: int
    mixed: bool  # slots with different ranges (restrict per position)
    size: Tensor  # [Ba] positions in the block
    step_budget: Tensor  # [Ba] steps for the block (count strategies) or their cap (adaptive)
    generators: list[torch.Generator]  # the active samples'
    cond: Tensor | None  # [Ba, L] their CFG condition positions (None without CFG)
    row: Tensor  # [Ba, 1] 0..Ba-1
    generation: _Generation | None  # strategy policy: every generated position

    @staticmethod
    def build(
        blocks: _Blocks, inputs: _Inputs, active: Tensor, block: Tensor, cfg: SamplerConfig
    ) -> _Window:
        """The window of samples ``active`` at their blocks ``block``."""
        length, n_masked = blocks.length[active], blocks.n_masked[active]
        slot = torch.arange(int(blocks.length.max()))
        # slot j of the window: the masked position of rank block * length + j, j < length
        rank = block[:, None] * length[:, None] + slot[None, :]
        in_block = (slot[None, :] < length[:, None]) & (rank < n_masked[:, None])
        rank = rank.clamp(max=blocks.order.shape[1] - 1)
        positions = blocks.order[active].gather(1, rank) * in_block
        modality = inputs.modality[active].gather(1, positions)
        ranges = inputs.ranges
        slot_lo, slot_hi = ranges[modality.clamp(0, len(ranges) - 1)].unbind(-1)
        lo = int(slot_lo.masked_fill(~in_block, 1 << 62).min())
        hi = int(slot_hi.masked_fill(~in_block, -1).max())
        mixed = bool(((slot_lo != lo) | (slot_hi != hi))[in_block].any())
        size = torch.minimum(length, n_masked - block * length)
        if cfg.steps is None:
            step_budget = size  # no cap: at most one step per token
        else:  # the steps split evenly over the blocks, the first ones one more
            n_blocks = blocks.count[active]
            extra = (block < cfg.steps % n_blocks).long()
            step_budget = (cfg.steps // n_blocks + extra).clamp(min=1)
        generators = [inputs.generators[b] for b in active.tolist()]
        cond = inputs.cond[active] if cfg.cfg_scale > 0 else None
        row = torch.arange(len(active))[:, None]
        generation = None
        if cfg.strategy == "policy":
            generation = _Generation.build(blocks, inputs, active, cfg)
        return _Window(
            active=active,
            block=block,
            positions=positions,
            in_block=in_block,
            modality=modality,
            ranges=ranges,
            lo=lo,
            hi=hi,
            mixed=mixed,
            size=size,
            step_budget=step_budget,
            generators=generators,
            cond=cond,
            row=row,
            generation=generation,
        )

    def covers(self, active: Tensor, block: Tensor) -> bool:
        """Whether this is the window of samples ``active`` at blocks ``block``."""
        return torch.equal(active, self.active) and torch.equal(block, self.block)

    def commit_count(self, step_in_block: Tensor, n_candidates: Tensor, adaptive: bool) -> Tensor:
        """``[Ba]`` positions to commit this step: LLaDA's schedule (count strategies; the
        block's last step fills it) or the minimum that meets the step cap (adaptive)."""
        budget, size = self.step_budget, self.size
        if adaptive:
            return (-(-n_candidates // (budget - step_in_block).clamp(min=1))).clamp(min=1)
        count = size // budget + (step_in_block < size % budget).long()
        return torch.where(step_in_block >= budget - 1, n_candidates, count)


@dataclass
class _Generation:
    """The active samples' generated positions (their masked positions of the input buffer, in
    order; ``G`` the most of any, the rest padding): what strategy ``policy`` observes."""

    positions: Tensor  # [Ba, G] buffer position (0 where padding)
    pad: Tensor  # [Ba, G] bool
    modality: Tensor  # [Ba, G] ranges row of each position
    lo: int  # logit columns lo:hi cover every position's range
    hi: int
    mixed: bool  # positions with different ranges (restrict per position)
    total_budget: Tensor  # [Ba] steps of the whole generation (the cap, or one per position)
    block_length: Tensor  # [Ba]

    @staticmethod
    def build(blocks: _Blocks, inputs: _Inputs, active: Tensor, cfg: SamplerConfig) -> _Generation:
        n_masked = blocks.n_masked[active]
        positions = blocks.order[active]
        pad = torch.arange(positions.shape[1])[None, :] >= n_masked[:, None]
        positions = positions.masked_fill(pad, 0)
        modality = inputs.modality[active].gather(1, positions)
        ranges = inputs.ranges
        pos_lo, pos_hi = ranges[modality.clamp(0, len(ranges) - 1)].unbind(-1)
        lo = int(pos_lo.masked_fill(pad, 1 << 62).min())
        hi = int(pos_hi.masked_fill(pad, -1).max())
        mixed = bool(((pos_lo != lo) | (pos_hi != hi))[~pad].any())
        budget = n_masked if cfg.steps is None else torch.full_like(n_masked, cfg.steps)
        return _Generation(
            positions, pad, modality, lo, hi, mixed, budget.clamp(min=1), blocks.length[active]
        )

    def index_of(self, window: _Window, candidates: Candidates) -> Tensor:
        """``[Ba, NC]`` each candidate's index among the generated positions."""
        start = window.block * self.block_length
        return (start[:, None] + candidates.slot).clamp(max=self.positions.shape[1] - 1)

    def observe(
        self, buffer: Tensor, window: _Window, mask_id: int, features: Tensor
    ) -> PolicyObservation:
        """The observation of this step (step fraction and last step are the caller's)."""
        idx = torch.arange(self.positions.shape[1])[None, :]
        start = (window.block * self.block_length)[:, None]
        masked = (buffer.gather(1, self.positions) == mask_id) & ~self.pad
        candidate = masked & (idx >= start) & (idx < start + self.block_length[:, None])
        features = features.masked_fill(self.pad[..., None], 0.0)
        none = torch.zeros(len(buffer), dtype=torch.bool)
        return PolicyObservation(
            features, masked, candidate, self.pad, none.double(), none, window.generators,
            window.active,
        )  # fmt: skip


@dataclass
class _Counters:
    """Per-sample progress, ``[B]`` each."""

    block: Tensor  # current block (the block count when done)
    step_in_block: Tensor
    nfe: Tensor
    steps: Tensor

    @staticmethod
    def zeros(batch: int) -> _Counters:
        return _Counters(*(torch.zeros(batch, dtype=torch.long) for _ in range(4)))

    def advance(
        self,
        active: Tensor,
        everyone: bool,
        block: Tensor,
        step_in_block: Tensor,
        block_done: Tensor,
        nfe: int,
    ) -> None:
        """Count a step of the samples ``active`` (at ``block``, ``step_in_block``; every sample
        if ``everyone``) that cost ``nfe`` forward passes; move those whose block is done on."""
        next_step = torch.where(block_done, 0, step_in_block + 1)
        next_block = block + block_done.long()
        if everyone:
            self.nfe += nfe
            self.steps += 1
            self.step_in_block, self.block = next_step, next_block
        else:
            self.nfe[active] += nfe
            self.steps[active] += 1
            self.step_in_block[active], self.block[active] = next_step, next_block


class _Model:
    """``logits_fn`` as the sampler calls it: the unconditional CFG pass in the same batch, just
    the candidates' logits where it takes ``positions``/``columns``, the block KV cache if
    used, timed."""

    def __init__(self, logits_fn: LogitsFn, mask_id: int, cfg_scale: float) -> None:
        self.logits_fn = logits_fn
        self.mask_id = mask_id
        self.guided = cfg_scale > 0
        self.nfe_per_step = 2 if self.guided else 1
        self.at_positions = _takes(logits_fn, "positions", "columns")
        self.cache: BlockCache | None = None
        self.seconds = 0.0  # time inside logits_fn

    def use_cache(self, mode: str, blocks: _Blocks) -> None:
        """Serve the samples through a block KV cache (``prefix`` / ``dual``)."""
        if not _takes(self.logits_fn, "positions", "columns", "cache"):
            raise SamplingError(
                f"cache '{mode}' needs a logits_fn that takes positions=, columns= and cache= "
                "(megadiff.generation.adapters builds one for the plain-PyTorch and for the "
                "megatron-core model); use cache 'none' with this one"
            )
        if len(blocks.count) and int(blocks.count.max()) <= 1:
            warnings.warn(
                f"cache '{mode}': every sample has a single block (block_length >= its masked "
                "positions), so the cache holds only what is outside that block and is "
                "refreshed never; set a smaller block_length for a speed-up",
                stacklevel=3,
            )
        self.cache = BlockCache(mode, len(blocks.count), self.guided)

    def candidate_logits(
        self, buffer: Tensor, window: _Window, candidates: Candidates, block_start: Tensor
    ) -> CandidateLogits:
        """Run the model on ``buffer`` ``[Ba, L]``; where its output holds the candidates'
        logits (all positions' where ``logits_fn`` cannot restrict). ``block_start`` ``[Ba]``:
        the samples at their block's first step (a cache's full forward)."""
        inputs = buffer
        if self.guided:
            inputs = torch.cat([buffer, buffer.masked_fill(window.cond, self.mask_id)])
        t0 = time.perf_counter()
        if self.cache is not None:
            logits = self._cached_logits(inputs, window, candidates, block_start)
        elif self.at_positions:
            pos = candidates.position
            at = torch.cat([pos, pos]) if self.guided else pos
            logits = self.logits_fn(inputs, positions=at, columns=(window.lo, window.hi))
        else:  # guidance is applied later, on the candidates' rows only
            logits = self.logits_fn(inputs)
        self.seconds += time.perf_counter() - t0
        return self._read(logits, len(inputs), window, candidates)

    def generation_logits(
        self, buffer: Tensor, window: _Window, candidates: Candidates, gen_index: Tensor
    ) -> tuple[CandidateLogits, CandidateLogits]:
        """One forward for strategy ``policy``: the candidates' logits and every generated
        position's (``window.generation``), both read from the same output."""
        gen = window.generation
        inputs = buffer
        if self.guided:
            inputs = torch.cat([buffer, buffer.masked_fill(window.cond, self.mask_id)])
        lo, hi = gen.lo, gen.hi
        t0 = time.perf_counter()
        if self.at_positions:
            pos = gen.positions
            at = torch.cat([pos, pos]) if self.guided else pos
            logits = self.logits_fn(inputs, positions=at, columns=(lo, hi))
            expected = (len(inputs), pos.shape[1], hi - lo)
            if logits.shape != expected:
                raise SamplingError(
                    f"logits_fn(positions=[{len(inputs)}, {pos.shape[1]}], columns=({lo}, {hi})) "
                    f"returned shape {tuple(logits.shape)}, expected {expected}"
                )
            table = logits.reshape(-1, hi - lo).cpu()
            sample_step = pos.shape[1]
            cand_rows = window.row * sample_step + gen_index
            all_rows = window.row * sample_step + torch.arange(sample_step)
        else:
            all_table, sample_step, position_step = row_view(self.logits_fn(inputs))
            table = all_table[:, lo:hi]
            cand_rows = window.row * sample_step + candidates.position * position_step
            all_rows = window.row * sample_step + gen.positions * position_step
        self.seconds += time.perf_counter() - t0
        uncond_offset = len(window.active) * sample_step
        gen_mod = gen.modality if gen.mixed else None
        cand_mod = gen.modality.gather(1, gen_index) if gen.mixed else None
        r = window.ranges
        return (
            CandidateLogits(table, cand_rows, uncond_offset, lo, cand_mod, r, compact=False),
            CandidateLogits(table, all_rows, uncond_offset, lo, gen_mod, r, compact=False),
        )

    def _cached_logits(
        self, inputs: Tensor, window: _Window, candidates: Candidates, block_start: Tensor
    ) -> Tensor:
        """The candidates' logits through the cache: a full forward (stored) for the samples at
        their block's first step, a span forward for the others; one call per kind."""
        ba = len(window.active)
        start, length = self.cache.span(window.positions, window.in_block, inputs.shape[1])
        parts = [(block_start, True), (~block_start, False)]
        parts = [(sel.nonzero(as_tuple=True)[0], fill) for sel, fill in parts if bool(sel.any())]
        out = None
        for sub, fill in parts:
            whole = len(sub) == ba
            at = torch.cat([sub, sub + ba]) if self.guided else sub  # its rows of inputs
            x = inputs if whole else inputs[at]
            pos = candidates.position if whole else candidates.position[sub]
            rows = self.cache.rows(window.active[sub])
            if fill:
                call = CacheCall()
            else:
                st, n = start[sub], length[sub]
                if self.guided:
                    st, n = torch.cat([st, st]), torch.cat([n, n])
                call = CacheCall(self.cache.read(rows), st, n)
            cols = (window.lo, window.hi)
            pos = torch.cat([pos, pos]) if self.guided else pos
            logits = self.logits_fn(x, positions=pos, columns=cols, cache=call)
            if fill:
                self.cache.write(rows, call.past)
            if len(parts) == 1:
                return logits
            if out is None:
                out = logits.new_empty(len(inputs), *logits.shape[1:])
            out[at.to(out.device)] = logits
        return out

    def _read(
        self, logits: Tensor, n_inputs: int, window: _Window, candidates: Candidates
    ) -> CandidateLogits:
        """``logits``: ``[n_inputs, NC, hi - lo]`` (at positions) or ``[n_inputs, L, V]``."""
        lo, hi = window.lo, window.hi
        n_cand = candidates.position.shape[1]
        if self.at_positions:
            expected = (n_inputs, n_cand, hi - lo)
            if logits.shape != expected:
                raise SamplingError(
                    f"logits_fn(positions=[{n_inputs}, {n_cand}], columns=({lo}, {hi})) returned "
                    f"shape {tuple(logits.shape)}, expected {expected}"
                )
            table = logits.reshape(-1, hi - lo).cpu()
            sample_step = n_cand
            rows = window.row * n_cand + torch.arange(n_cand)
        else:
            all_rows, sample_step, position_step = row_view(logits)
            table = all_rows[:, lo:hi]
            rows = window.row * sample_step + candidates.position * position_step
        modality = window.modality.gather(1, candidates.slot) if window.mixed else None
        uncond_offset = len(window.active) * sample_step  # the unconditional rows follow
        return CandidateLogits(
            table, rows, uncond_offset, lo, modality, window.ranges, compact=self.at_positions
        )


def _takes(logits_fn: LogitsFn, *names: str) -> bool:
    """Whether ``logits_fn`` accepts the keyword arguments ``names`` (see :data:`LogitsFn`)."""
    try:
        params = inspect.signature(logits_fn).parameters
    except (TypeError, ValueError):  # builtins, some C callables
        return False
    return all(n in params for n in names)
