"""A built-in synthetic tri-modal token source with learnable structure (no files needed).

Its ids follow the shared vocabulary layout (:class:`~megadiff.data.vocab.VocabLayout`) of
:func:`synthetic_layout`: a text block (the 256 byte tokens when ``model.vocab_size`` leaves
room for them), the specials, MASK and PAD, then image and audio codebooks splitting the rest.
Checkpoints record that layout (``vocab.json``) and, with the 256 byte tokens, a byte-level text
tokenizer (:func:`write_byte_tokenizer`), so ``megadiff generate --task text`` samples from
them. The source holds ``num_templates`` random "documents"; a sample is one of them (text
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

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from megadiff.data.vocab import TEXT_SPECIALS, VocabLayout
from megadiff.plan import SYNTHETIC_MIN_VOCAB

HELD_OUT_KEY = 0x5EED_0E7A  # the held-out samples' seed stream (training uses [seed, index])
BYTES = 256  # the text block of a synthetic layout, when it fits: one id per byte
LAYOUT_OVERHEAD = len(TEXT_SPECIALS) + 6  # specials, MASK PAD, <boi> <eoi>, <boa> <eoa>


def synthetic_layout(vocab_size: int) -> VocabLayout:
    """The vocabulary layout of ``vocab_size`` synthetic ids: 256 text (byte) ids when at least
    two codebook ids are left, else a third of the code ids; image and audio codebooks (one
    codebook) split the rest."""
    if vocab_size < SYNTHETIC_MIN_VOCAB:
        raise ValueError(
            f"model.vocab_size={vocab_size}: the synthetic source needs >= {SYNTHETIC_MIN_VOCAB}"
        )
    codes = vocab_size - LAYOUT_OVERHEAD
    text = BYTES if codes >= BYTES + 2 else max(1, codes // 3)
    image = (codes - text) // 2
    layout = VocabLayout(
        text_size=text,
        image_codebook_size=image,
        audio_codebook_size=codes - text - image,
        text_tokenizer="bytes" if text == BYTES else "",
        extra={"source": "synthetic"},
    )
    assert layout.vocab_size == vocab_size
    return layout


def write_byte_tokenizer(path: str | Path) -> Path:
    """A byte-level tiktoken rank file (token ``i`` is byte ``i``) and its ``.json`` sidecar: the
    text tokenizer of a synthetic run whose layout has the 256 byte ids."""
    from megadiff.data.tokenizers.text import GPT4_PATTERN, save_ranks

    return save_ranks({bytes([i]): i for i in range(BYTES)}, path, GPT4_PATTERN, "bytes")


class SyntheticSource:
    def __init__(
        self,
        vocab_size: int,
        seq_length: int,
        seed: int = 0,
        num_templates: int = 32,
        substitution: float = 0.05,
    ) -> None:
        self.vocab = synthetic_layout(vocab_size)
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.seed = seed
        self.mask_id = self.vocab.mask_id
        self.pad_id = self.vocab.pad_id
        v = self.vocab
        # ids drawn per modality: text tokens, image codes, audio codes (no specials)
        self.ranges = [
            (0, v.text_size),
            (v.image_start, v.image_start + v.image_codebook_size),
            (v.audio_start, v.vocab_size),
        ]
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
        """``[4, 2]`` logit ranges of the layout: text, image, audio, then PAD's own id."""
        return self.vocab.ranges_array()

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
