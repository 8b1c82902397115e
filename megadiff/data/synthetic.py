"""A built-in synthetic tri-modal token source with learnable structure (no files needed).

The vocabulary's last two ids are MASK and PAD; the rest is split into text, image and audio
ranges. The source holds ``num_templates`` random "documents"; a sample is one of them (text
segment, then the image and audio segments that belong to it) with a small fraction of tokens
substituted at random. A masked token is recoverable from the visible ones, so the loss falls
steadily; the cross-modal segments make the conditionals (text -> image/audio) learnable.

Samples are a pure function of (seed, global sample index): micro-batch ``g`` of step ``s``
holds samples ``s*G + g*b ... s*G + (g+1)*b - 1``, so any DP x accumulation split sees the
same global batch, and resume is exact without loader state. :meth:`SyntheticSource.held_out`
draws the held-out sequences from a separate seed stream: the same documents, other
substitutions, never a training sample.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from megadiff.plan import SYNTHETIC_MIN_VOCAB

HELD_OUT_KEY = 0x5EED_0E7A  # the held-out samples' seed stream (training uses [seed, index])


class SyntheticSource:
    def __init__(
        self,
        vocab_size: int,
        seq_length: int,
        seed: int = 0,
        num_templates: int = 32,
        substitution: float = 0.05,
    ) -> None:
        if vocab_size < SYNTHETIC_MIN_VOCAB:
            raise ValueError(
                f"model.vocab_size={vocab_size}: the synthetic source needs "
                f">= {SYNTHETIC_MIN_VOCAB}"
            )
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.seed = seed
        self.mask_id = vocab_size - 2
        self.pad_id = vocab_size - 1
        span = (vocab_size - 2) // 3
        self.ranges = [(0, span), (span, 2 * span), (2 * span, vocab_size - 2)]
        n_text = seq_length // 2
        n_img = (seq_length - n_text) // 2
        self.lengths = [n_text, n_img, seq_length - n_text - n_img]
        self.substitution = substitution
        rng = np.random.default_rng([seed, 0xD1FF])
        self.templates = np.concatenate(
            [
                lo + rng.integers(0, hi - lo, (num_templates, n))
                for (lo, hi), n in zip(self.ranges, self.lengths, strict=True)
            ],
            axis=1,
        )
        self.modality = np.repeat(np.arange(3), self.lengths)

    def held_out(self, size: int) -> dict[str, Tensor]:
        """The first ``size`` held-out samples (the same for any run of these templates)."""
        return self.batch(0, size, held_out=True)

    def ranges_array(self) -> np.ndarray:
        """``[4, 2]`` logit ranges: text, image, audio, then PAD's own id."""
        return np.array([*self.ranges, (self.pad_id, self.pad_id + 1)], np.int64)

    def sample(self, index: int, held_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Training sample ``index`` (or held-out sample ``index``): tokens and modality ids."""
        key = [self.seed, HELD_OUT_KEY, index] if held_out else [self.seed, index]
        rng = np.random.default_rng(key)
        tokens = self.templates[rng.integers(len(self.templates))].copy()
        subst = rng.random(self.seq_length) < self.substitution
        for m, (lo, hi) in enumerate(self.ranges):
            sel = subst & (self.modality == m)
            tokens[sel] = rng.integers(lo, hi, int(sel.sum()))
        return tokens, self.modality.copy()

    def batch(self, start: int, size: int, held_out: bool = False) -> dict[str, Tensor]:
        pairs = [self.sample(start + i, held_out) for i in range(size)]
        tokens = torch.from_numpy(np.stack([p[0] for p in pairs])).long()
        modality = torch.from_numpy(np.stack([p[1] for p in pairs])).long()
        return {"tokens": tokens, "modality": modality}

    def microbatches(
        self, step: int, global_batch: int, micro_batch: int, dp_rank: int, n_micro: int
    ) -> list[dict[str, Tensor]]:
        """This DP rank's micro-batches of ``step``, each tagged with its local index."""
        out = []
        for mb in range(n_micro):
            g = dp_rank * n_micro + mb
            batch = self.batch(step * global_batch + g * micro_batch, micro_batch)
            batch["microbatch"] = mb
            out.append(batch)
        return out

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
