"""Load a training checkpoint for generation: weights, vocabulary layout and tokenizers.

``--ckpt`` is a checkpoint directory (``step_N/``), a run's ``checkpoints/`` directory or a run
directory (the newest valid checkpoint wins). Any TP/PP/VPP layout is read as full tensors in
this process (:func:`~megadiff.model.reader.read_checkpoint_model`) into the plain-PyTorch
:class:`~megadiff.model.reference.ReferenceModel`. The tokenizers come from the checkpoint's
``tokenizers/`` (:data:`~megadiff.data.tokenizers.files.TOKENIZER_FILES`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megadiff.checkpoint_files import CheckpointError
from megadiff.config import Config
from megadiff.data.names import TASK_MODALITIES
from megadiff.data.tokenizers.files import TOKENIZER_FILES
from megadiff.data.vocab import VocabLayout

__all__ = ["CheckpointError", "GenerationBundle", "load_for_generation"]


@dataclass
class GenerationBundle:
    logits_fn: Any  # tokens [B, L] -> logits [B, L, V]
    vocab: VocabLayout
    tokenizers: dict[str, Any] = field(default_factory=dict)  # text / image / audio
    cfg: Config | None = None
    path: str = ""
    step: int | None = None

    def require(self, task: str) -> None:
        """Raise :class:`CheckpointError` if a tokenizer ``task`` needs is missing."""
        for kind in TASK_MODALITIES.get(task, ()):  # each modality's tokenizer
            if self.tokenizers.get(kind) is None:
                synthetic = self.vocab.extra.get("source") == "synthetic"
                why = (
                    "a data.source=synthetic run has random codes and only a byte-level text "
                    "tokenizer (with model.vocab_size >= 271); train on MDS shards for this task"
                    if synthetic
                    else f"expected tokenizers/{TOKENIZER_FILES[kind]} in the checkpoint"
                )
                raise CheckpointError(
                    f"checkpoint '{self.path}' has no {kind} tokenizer, needed by task '{task}' "
                    f"({why})"
                )


def load_tokenizers(ckpt: Path) -> dict[str, Any]:
    """The tokenizers found in ``<ckpt>/tokenizers`` (absent kinds are left out)."""
    from megadiff.data.tokenizers.audio import SpectralRVQ
    from megadiff.data.tokenizers.image import PatchVQ
    from megadiff.data.tokenizers.text import load_text_tokenizer

    loaders = {"text": load_text_tokenizer, "image": PatchVQ.load, "audio": SpectralRVQ.load}
    out: dict[str, Any] = {}
    for kind, name in TOKENIZER_FILES.items():
        f = ckpt / "tokenizers" / name
        if f.is_file():
            try:
                out[kind] = loaders[kind](str(f))
            except Exception as e:
                raise CheckpointError(f"checkpoint {ckpt}: cannot load {f.name}: {e}") from e
    return out


def load_for_generation(path: str | os.PathLike, checksums: bool = True) -> GenerationBundle:
    """The model (as a ``logits_fn``), vocabulary layout, tokenizers and config of a checkpoint."""
    import torch

    from megadiff.generation.adapters import reference_logits_fn
    from megadiff.model.reader import read_checkpoint_model
    from megadiff.model.reference import ReferenceConfig, ReferenceModel
    from megadiff.parallel import cpu_compat

    if not Path(path).exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    compat = cpu_compat.is_enabled()
    try:
        cm = read_checkpoint_model(path, checksums)
    finally:
        if not compat:  # reading needed megatron-core on CPU; sampling the reference model not
            cpu_compat.disable()
    if cm.vocab is None:
        raise CheckpointError(f"checkpoint {cm.path} has no vocab.json (not a tokenized run)")
    vocab = VocabLayout.from_dict(cm.vocab)
    if cm.cfg.model.vocab_size != vocab.vocab_size:
        raise CheckpointError(
            f"checkpoint {cm.path}: model.vocab_size {cm.cfg.model.vocab_size} != vocab.json's "
            f"{vocab.vocab_size}"
        )
    model = ReferenceModel(ReferenceConfig.from_model_config(cm.cfg.model))
    with torch.no_grad():
        model.load_state_dict(cm.params)
    fn = reference_logits_fn(model, vocab.pad_id, vocab.vocab_size)
    tokenizers = load_tokenizers(cm.path)
    return GenerationBundle(fn, vocab, tokenizers, cm.cfg, str(cm.path), cm.meta.get("step"))
