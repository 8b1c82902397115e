"""Block KV caches for semi-autoregressive sampling (Fast-dLLM's prefix and dual cache).

With ``cache`` ``prefix`` or ``dual`` the sampler asks its ``logits_fn`` for two kinds of
forward pass:

* at the first step of each sample's block: a full forward over the whole buffer that also
  returns every layer's keys and values (the sample's cache; under CFG the unconditional
  buffer gets a second one). Its logits are those of the uncached forward;
* at the block's later steps: a forward of one span of each row only (``prefix``: from the
  block's first position to the end of the buffer; ``dual``: the block's positions alone),
  whose queries attend to the span's fresh keys/values and to the cached ones elsewhere.

Both are approximations: outside the span, keys and values are those of the buffer at the
block's first step (before the block's tokens were committed), refreshed at the next block.
``none`` runs the whole buffer at every step and is exact. NFE counts a step as one forward
(two with CFG) with or without a cache.

A ``logits_fn`` takes part by accepting a ``cache`` keyword (a :class:`CacheCall`) besides
``positions`` and ``columns`` (:func:`megadiff.generation.adapters.reference_logits_fn` and
:func:`~megadiff.generation.adapters.megatron_logits_fn`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CACHES = ("none", "prefix", "dual")


@dataclass
class CacheCall:
    """A cached forward as the sampler asks it. ``past`` None: a full forward, which sets
    ``past`` to its cache (a list of tensors with one row per input row). Otherwise run only
    the span ``start .. start + length - 1`` (``[n]`` each) of every row against ``past``
    (which the call may write over); ``positions`` are still buffer positions (in the span)."""

    past: list[Tensor] | None = None
    start: Tensor | None = None
    length: Tensor | None = None


class BlockCache:
    """The caches of one ``sample`` call: per tensor of a model's cache, one row per sample
    (rows ``n..2n-1``: the samples' unconditional buffers under CFG), filled by the full
    forward at each sample's block start."""

    def __init__(self, mode: str, n_samples: int, guided: bool) -> None:
        self.mode = mode
        self.n = n_samples
        self.guided = guided
        self.tensors: list[Tensor] = []

    def rows(self, ids: Tensor) -> Tensor:
        """Cache rows of the samples ``ids`` (conditional, then unconditional rows)."""
        return torch.cat([ids, ids + self.n]) if self.guided else ids

    def _whole(self, rows: Tensor) -> bool:
        return len(rows) == len(self.tensors[0]) and torch.equal(rows, torch.arange(len(rows)))

    def write(self, rows: Tensor, past: list[Tensor]) -> None:
        """Store a full forward's cache ``past`` of the inputs that are ``rows``."""
        if not self.tensors:
            total = self.n * (2 if self.guided else 1)
            self.tensors = [t.new_zeros(total, *t.shape[1:]) for t in past]
        if self._whole(rows):
            self.tensors = list(past)
            return
        dev = self.tensors[0].device
        for mine, new in zip(self.tensors, past):
            mine[rows.to(dev)] = new

    def read(self, rows: Tensor) -> list[Tensor]:
        """The cache of ``rows`` (the stored tensors themselves when that is every row)."""
        if self._whole(rows):
            return self.tensors
        dev = self.tensors[0].device
        return [t[rows.to(dev)] for t in self.tensors]

    def span(self, positions: Tensor, in_block: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
        """``(start, length)`` ``[Ba]`` of the rows' spans, from their blocks' window
        (``positions``, ``in_block`` ``[Ba, W]``)."""
        start = positions.masked_fill(~in_block, seq_len).amin(1)
        if self.mode == "prefix":
            return start, seq_len - start
        end = positions.masked_fill(~in_block, -1).amax(1) + 1
        return start, end - start
