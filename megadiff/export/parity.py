"""Logits parity between megadiff's megatron-core model and the Hugging Face model.

Both run in fp32 on the same random inputs (real token ids, MASK ids and right padding). The
comparison covers the real vocabulary columns at non-padding positions; the padded vocabulary
columns must be -inf in both. It passes when ``max |a - b| <= tol * max(1, max |a|)``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DEFAULT_TOL = 1e-5


def random_inputs(
    vocab_size: int, seq_len: int, mask_id: int | None, batch: int = 3, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``tokens [b, s]`` (about 30% MASK when ``mask_id`` is set) and ``pad [b, s]`` (True =
    padding; row 1 has its last quarter padded)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch, seq_len), generator=gen)
    if mask_id is not None:
        masked = torch.rand(batch, seq_len, generator=gen) < 0.3
        tokens[masked] = mask_id
    pad = torch.zeros(batch, seq_len, dtype=torch.bool)
    if batch > 1:
        pad[1, seq_len - max(seq_len // 4, 1) :] = True
    return tokens, pad


@torch.no_grad()
def megatron_logits(cfg, params: dict[str, Tensor], tokens: Tensor, pad: Tensor) -> Tensor:
    """megadiff's own forward (megatron-core model at TP = PP = 1, fp32 CPU) -> ``[b, s, V]``.

    Uses the existing process group if there is one, else a one-process group of its own.
    """
    from megadiff.model.build import build_model
    from megadiff.model.gather import load_full_tensors, unwrap
    from megadiff.parallel.state import set_single_process_layout, single_process_group

    cfg = copy.deepcopy(cfg)
    set_single_process_layout(cfg)
    cfg.train.precision = "fp32"
    with single_process_group(cfg):
        chunks = build_model(cfg)
        load_full_tensors(chunks, params)
        model = unwrap(chunks[0]).eval()
        out = model(tokens, pad[:, None, None, :] if pad.any() else None)  # [s, b, V]
    return out.transpose(0, 1).float().contiguous()


@torch.no_grad()
def hf_logits(model_or_dir, tokens: Tensor, pad: Tensor) -> Tensor:
    """The HF model's logits; a directory is loaded with ``AutoModel`` (trust_remote_code)."""
    model = model_or_dir
    if isinstance(model_or_dir, (str, Path)):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(model_or_dir), trust_remote_code=True)
    model = model.float().eval()
    return model(input_ids=tokens, attention_mask=(~pad).long()).logits.float()


@dataclass
class Parity:
    max_abs_diff: float
    max_abs_logit: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tol * max(1.0, self.max_abs_logit)

    def describe(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (
            f"logits parity {verdict}: max |diff| = {self.max_abs_diff:.3e} "
            f"(tolerance {self.tol:g} x max(1, max |logit| = {self.max_abs_logit:.3g}))"
        )


def compare(ref: Tensor, got: Tensor, pad: Tensor, vocab_size: int, tol: float) -> Parity:
    """Parity of ``got`` against ``ref`` (both ``[b, s, V_padded]``)."""
    if ref.shape != got.shape:
        return Parity(float("inf"), 0.0, tol)
    keep = ~pad
    a, b = ref[..., :vocab_size][keep], got[..., :vocab_size][keep]
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return Parity(float("inf"), 0.0, tol)
    padded_ok = (
        torch.isneginf(ref[..., vocab_size:]).all() and torch.isneginf(got[..., vocab_size:]).all()
    )
    diff = (a - b).abs().max().item() if padded_ok else float("inf")
    return Parity(diff, a.abs().max().item(), tol)
