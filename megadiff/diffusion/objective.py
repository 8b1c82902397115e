"""The masked-diffusion forward process and its ELBO-weighted loss.

Noise is drawn from a CPU generator keyed by (seed, step, DP rank, micro-batch): every TP rank
and pipeline stage of one DP replica recomputes the same mask, and DP replicas differ. DP rank
and micro-batch enter as the *global* micro-batch index ``dp_rank * num_microbatches +
microbatch``, so a global batch gets the same noise whatever its DP x accumulation split.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from megadiff.config import DiffusionConfig
from megadiff.data.names import MODALITIES
from megadiff.diffusion.schedules import Schedule


def noise_seed(seed: int, step: int, global_microbatch: int) -> int:
    """A 63-bit seed from the noise key (SplitMix64-style mixing; stable across versions)."""
    x = 0
    for part in (seed, step, global_microbatch):
        x = (x ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def noise_generator(
    seed: int, step: int, dp_rank: int, microbatch: int, num_microbatches: int
) -> torch.Generator:
    """The generator for micro-batch ``microbatch`` of DP rank ``dp_rank`` at ``step``."""
    g = dp_rank * num_microbatches + microbatch
    return torch.Generator(device="cpu").manual_seed(noise_seed(seed, step, g))


def sample_t(
    n: int, gen: torch.Generator, method: str = "antithetic", t_min: float = 1e-3
) -> Tensor:
    """Per-sequence diffusion times in [t_min, 1].

    ``uniform``: i.i.d.; ``stratified``: one uniform offset shifted by i/n (low discrepancy);
    ``antithetic``: pairs (u, 1-u), so every pair covers [0, 1] symmetrically.
    """
    if method == "uniform":
        u = torch.rand(n, generator=gen, dtype=torch.float64)
    elif method == "stratified":
        u0 = torch.rand(1, generator=gen, dtype=torch.float64)
        u = (u0 + torch.arange(n, dtype=torch.float64) / n) % 1.0
        u = u[torch.randperm(n, generator=gen)]
    elif method == "antithetic":
        half = torch.rand((n + 1) // 2, generator=gen, dtype=torch.float64)
        u = torch.cat([half, 1.0 - half])[:n]
    else:
        raise ValueError(f"unknown t sampling method '{method}'")
    return (t_min + (1.0 - t_min) * u).float()


@dataclass
class Corrupted:
    """A noised micro-batch: what the model reads and what the loss needs."""

    inputs: Tensor  # [b, s] tokens with MASK at masked positions
    targets: Tensor  # [b, s] clean tokens
    weight: Tensor  # [b, s] ELBO weight at masked positions, 0 elsewhere
    valid: Tensor  # [b, s] bool: not padding
    modality: Tensor  # [b, s] modality id per position
    t: Tensor  # [b]
    attention_mask: Tensor | None  # [b, 1, 1, s] True = masked-out key (PAD); None if no PAD


def weight_rows(batch: Corrupted, row_weight: Tensor) -> Corrupted:
    """``batch`` with each row's loss weights multiplied by ``row_weight`` [b]."""
    return replace(batch, weight=batch.weight * row_weight.to(batch.weight.dtype)[:, None])


class MaskingObjective:
    """Forward (masking) process and loss for one vocabulary layout."""

    def __init__(
        self, cfg: DiffusionConfig, mask_id: int, pad_id: int, ranges: Tensor | None = None
    ) -> None:
        """``ranges``: ``[M, 2]`` logit range (start, end) per modality id (PAD's row last),
        used when ``cfg.restrict_loss_to_modality``."""
        self.cfg = cfg
        self.mask_id = mask_id
        self.pad_id = pad_id
        self.ranges = ranges
        if cfg.restrict_loss_to_modality and ranges is None:
            raise ValueError("diffusion.restrict_loss_to_modality needs the vocabulary's ranges")
        base = Schedule(cfg.schedule, cfg.schedule_exponent)
        self.schedules = [
            Schedule(cfg.modality_schedules[m], cfg.schedule_exponent)
            if m in cfg.modality_schedules
            else base
            for m in MODALITIES
        ]

    @classmethod
    def for_source(cls, cfg: DiffusionConfig, source) -> MaskingObjective:
        """The objective for a data source's vocabulary (mask/pad ids, modality ranges)."""
        ranges = torch.from_numpy(source.ranges_array())
        return cls(cfg, mask_id=source.mask_id, pad_id=source.pad_id, ranges=ranges)

    def _per_position(self, fn: str, t: Tensor, modality: Tensor) -> Tensor:
        tt = t[:, None].expand_as(modality)
        out = getattr(self.schedules[0], fn)(tt)
        for m in range(1, len(MODALITIES)):
            if self.schedules[m] is not self.schedules[0]:
                out = torch.where(modality == m, getattr(self.schedules[m], fn)(tt), out)
        return out

    def corrupt(
        self, tokens: Tensor, modality: Tensor, gen: torch.Generator, prompt: Tensor | None = None
    ) -> Corrupted:
        """Mask each valid token with probability 1 - alpha(t) (per-modality schedules).

        ``prompt`` [b]: known prompt lengths (0 = unknown) for ``clean_prompt_prob``."""
        b, s = tokens.shape
        cfg = self.cfg
        tokens = tokens.cpu()
        modality = modality.cpu()
        t = sample_t(b, gen, cfg.t_sampling, cfg.t_min)
        u = torch.rand(b, s, generator=gen)
        cut_u = torch.rand(b, generator=gen)
        cut_len = torch.randint(1, s + 1, (b,), generator=gen)
        whole_u = torch.rand(b, generator=gen)
        whole_pick = torch.randint(0, len(MODALITIES), (b,), generator=gen)

        valid = tokens != self.pad_id
        cut = cut_u < cfg.random_length_prob  # ~1% of sequences get a random length
        if cut.any():
            pos = torch.arange(s)[None, :]
            drop = cut[:, None] & (pos >= cut_len[:, None])
            tokens = tokens.masked_fill(drop, self.pad_id)
            valid = valid & ~drop
        masked = (u < self._per_position("mask_prob", t, modality)) & valid
        weight = self._per_position("weight", t, modality)
        if cfg.modality_mask_prob > 0:
            # whole-modality masking (conditionals / CFG): one modality of a multi-modal
            # sequence is masked entirely and weighted as at t = 1
            present = torch.stack([((modality == m) & valid).any(1) for m in range(3)], 1)
            multi = present.sum(1) > 1
            pick = _pick_present(present, whole_pick)
            whole = (whole_u < cfg.modality_mask_prob) & multi
            full = whole[:, None] & (modality == pick[:, None]) & valid
            masked = masked | full
            w1 = self._per_position("weight", torch.ones(b), modality)
            weight = torch.where(full, w1, weight)
        if cfg.clean_prompt_prob > 0:  # drawn last: the draws above are the same without it
            keep = clean_prompt(modality, valid, cfg.clean_prompt_prob, gen, prompt)
            masked = masked & ~keep
        if cfg.loss_weighting == "uniform":
            weight = torch.ones_like(weight)
        weight = torch.where(masked, weight, torch.zeros_like(weight))
        inputs = tokens.masked_fill(masked, self.mask_id)
        attn = None if bool(valid.all()) else ~valid[:, None, None, :]
        return Corrupted(inputs, tokens, weight, valid, modality, t, attn)

    def mask_exactly(
        self, tokens: Tensor, modality: Tensor, counts: Tensor, scores: Tensor
    ) -> Corrupted:
        """Mask exactly ``counts[b]`` valid tokens of each row (those with the lowest
        ``scores`` [b, s], i.e. a uniform subset for uniform scores), each weighted by
        ``valid tokens / counts``: the ELBO in its count form (:mod:`megadiff.training.
        evaluation`). ``t`` records the masked fraction."""
        valid = tokens != self.pad_id
        rank = scores.masked_fill(~valid, float("inf")).argsort(1).argsort(1)
        masked = (rank < counts[:, None]) & valid
        n = valid.sum(1)
        weight = torch.where(masked, (n / counts).float()[:, None], torch.zeros(()))
        inputs = tokens.masked_fill(masked, self.mask_id)
        attn = None if bool(valid.all()) else ~valid[:, None, None, :]
        return Corrupted(inputs, tokens, weight, valid, modality, counts / n, attn)

    def loss(self, logits: Tensor, batch: Corrupted) -> tuple[Tensor, Tensor]:
        """ELBO-weighted masked cross entropy, normalised by the token count B*L.

        ``logits``: vocab-parallel ``[s, b, V/tp]``. Returns the scalar loss and a stats
        vector ``[weighted_sum, count, (sum_m, count_m) for each modality]`` for reporting.
        """
        per_tok = self.weighted_ce(logits, batch)
        total = per_tok.sum()
        loss = total / per_tok.numel()
        with torch.no_grad():
            mod = batch.modality.to(per_tok.device).flatten()
            valid = batch.valid.to(per_tok.device).flatten()
            onehot = F.one_hot(mod.clamp(0, len(MODALITIES) - 1), len(MODALITIES))
            onehot = onehot.to(per_tok.dtype) * valid[:, None]  # [b*s, M]
            sums = per_tok.detach().flatten() @ onehot
            counts = onehot.sum(0)
            head = torch.stack([total.detach(), per_tok.new_tensor(float(per_tok.numel()))])
            stats = torch.cat([head, torch.stack([sums, counts], 1).flatten()])
        return loss, stats

    def weighted_ce(self, logits: Tensor, batch: Corrupted) -> Tensor:
        """Per-position cross entropy times the ELBO weight, ``[b, s]`` (0 where unmasked).

        ``logits``: vocab-parallel ``[s, b, V/tp]``."""
        from megatron.core import parallel_state, tensor_parallel

        targets = batch.targets.to(logits.device).t().contiguous()
        if self.cfg.restrict_loss_to_modality:
            shard = logits.shape[-1]
            offset = parallel_state.get_tensor_model_parallel_rank() * shard
            pad_row = self.ranges.shape[0] - 1  # PAD positions may only be PAD
            mod = torch.where(batch.valid, batch.modality, pad_row)
            logits = restrict_to_modality(logits, mod.t(), self.ranges, offset)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets)
        else:  # whole vocabulary on this rank: the same quantity, one fused kernel
            ce = F.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), reduction="none"
            ).view_as(targets)
        ce = ce.t()  # [b, s]
        return ce * batch.weight.to(ce.device)


def clean_prompt(
    modality: Tensor,
    valid: Tensor,
    prob: float,
    gen: torch.Generator,
    prompt: Tensor | None = None,
) -> Tensor:
    """``[b, s]`` positions kept unmasked in a fraction ``prob`` of the rows: the prompt.

    In a row of several modality segments (a paired row: ``<t2i> caption <boi> codes <eoi>``)
    the prompt is everything before its last segment, so only what the task generates is noised
    (the row's conditional ELBO); in a single-modality row it is its known prompt (``prompt[b]``
    > 0 tokens: a one-problem row of a stream with ``prompt_end``), else (packed text) the
    tokens before a uniformly drawn split point. Conditioning on a clean prompt is what prompted
    sampling does, and a small model learns it far sooner from these rows than from jointly
    noised ones.
    """
    b, s = modality.shape
    chosen = torch.rand(b, generator=gen) < prob
    split_u = torch.rand(b, generator=gen)
    pos = torch.arange(s)[None, :]
    change = (modality[:, 1:] != modality[:, :-1]) & valid[:, 1:]
    last_segment = torch.where(change, pos[:, 1:], torch.zeros_like(pos[:, 1:])).amax(1)
    split = (split_u * valid.sum(1)).long()
    start = torch.where(last_segment > 0, last_segment, split)
    if prompt is not None:
        known = prompt.to(start.device)
        start = torch.where((last_segment == 0) & (known > 0), known, start)
    return chosen[:, None] & (pos < start[:, None]) & valid


def restrict_to_modality(
    logits: Tensor, modality: Tensor, ranges: Tensor, col_offset: int = 0
) -> Tensor:
    """-inf every logit outside its position's modality range.

    ``logits``: ``[..., V_shard]`` whose columns are global ids ``col_offset + j``;
    ``modality``: ids broadcastable to ``logits.shape[:-1]``; ``ranges``: ``[M, 2]``.
    """
    ranges = ranges.to(logits.device)
    mod = modality.to(logits.device).clamp(0, ranges.shape[0] - 1)
    lo, hi = ranges[mod, 0].unsqueeze(-1), ranges[mod, 1].unsqueeze(-1)
    col = torch.arange(logits.shape[-1], device=logits.device) + col_offset
    return logits.masked_fill((col < lo) | (col >= hi), float("-inf"))


def _pick_present(present: Tensor, r: Tensor) -> Tensor:
    """For each row, the (r mod #present)-th present modality."""
    counts = present.sum(1).clamp(min=1)
    k = r % counts
    order = torch.cumsum(present.long(), 1) - 1
    hit = present & (order == k[:, None])
    return hit.float().argmax(1)


def summarize(stats: Tensor) -> dict[str, float]:
    """Turn a summed stats vector into ``loss`` and ``loss_<modality>`` values."""
    out = {"loss": float(stats[0] / stats[1].clamp(min=1))}
    for m, name in enumerate(MODALITIES):
        s, c = stats[2 + 2 * m], stats[3 + 2 * m]
        if c > 0:
            out[f"loss_{name}"] = float(s / c)
    return out
