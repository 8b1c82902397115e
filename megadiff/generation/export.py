"""A simple self-contained generation checkpoint, until the distributed checkpoints land.

Layout of ``<dir>``::

    config.yaml        the run's resolved config (as the trainer writes it to run.dir)
    model.pt           full (unsharded) tensors, loadable into ReferenceModel
    vocab.json         the VocabLayout
    tokenizers/        text.tiktoken (+ text.json), image.vq, audio.codec (those the run has)

:func:`load_for_generation` reads it (tokenizers are looked up in ``<dir>/tokenizers`` first,
then next to ``data.vocab``'s file, ``<data root>/tokenizers``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from megadiff.config import Config, config_from_dict, dump_config
from megadiff.data.vocab import VocabLayout

TOKENIZER_FILES = {"text": "text.tiktoken", "image": "image.vq", "audio": "audio.codec"}
# tokenizers each task needs
TASK_TOKENIZERS = {
    "text": ("text",),
    "t2i": ("text", "image"),
    "caption": ("text", "image"),
    "t2s": ("text", "audio"),
    "asr": ("text", "audio"),
}


class CheckpointError(ValueError):
    """A generation checkpoint that is missing or lacks what a task needs."""


@dataclass
class GenerationBundle:
    logits_fn: Any  # tokens [B, L] -> logits [B, L, V]
    vocab: VocabLayout
    tokenizers: dict[str, Any] = field(default_factory=dict)  # text / image / audio
    cfg: Config | None = None
    path: str = ""

    def require(self, task: str) -> None:
        """Raise :class:`CheckpointError` if a tokenizer ``task`` needs is missing."""
        for kind in TASK_TOKENIZERS.get(task, ()):
            if self.tokenizers.get(kind) is None:
                raise CheckpointError(
                    f"checkpoint '{self.path}' has no {kind} tokenizer, needed by task '{task}' "
                    f"(expected {TOKENIZER_FILES[kind]} in <ckpt>/tokenizers or next to the vocab)"
                )


def _tokenizer_dirs(ckpt: Path, cfg: Config) -> list[Path]:
    dirs = [ckpt / "tokenizers"]
    if cfg.data.vocab:
        v = Path(cfg.data.vocab)
        dirs += [v.parent / "tokenizers", ckpt.parent / v.parent / "tokenizers"]
    return dirs


def save_generation_checkpoint(trainer, out_dir: str | Path) -> Path | None:
    """Write the trainer's model as a generation checkpoint (collective: call on every rank).

    Returns the directory on the logging rank, ``None`` elsewhere.
    """
    from megadiff.model.gather import full_tensors

    params = full_tensors(trainer.model, "param")
    if not trainer.ranks.is_logger:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = trainer.cfg
    torch.save(params, out / "model.pt")
    (out / "config.yaml").write_text(dump_config(cfg))
    if cfg.data.vocab and Path(cfg.data.vocab).is_file():
        shutil.copy(cfg.data.vocab, out / "vocab.json")
        src = Path(cfg.data.vocab).parent / "tokenizers"
        if src.is_dir():
            shutil.copytree(src, out / "tokenizers", dirs_exist_ok=True)
    return out


def load_tokenizers(ckpt: Path, cfg: Config) -> dict[str, Any]:
    from megadiff.data.audio_tokenizer import SpectralRVQ
    from megadiff.data.image_tokenizer import PatchVQ
    from megadiff.data.text_tokenizer import load_text_tokenizer

    loaders = {"text": load_text_tokenizer, "image": PatchVQ.load, "audio": SpectralRVQ.load}
    out: dict[str, Any] = {}
    for kind, name in TOKENIZER_FILES.items():
        for d in _tokenizer_dirs(ckpt, cfg):
            if (d / name).is_file():
                out[kind] = loaders[kind](str(d / name))
                break
    return out


def load_for_generation(ckpt_dir: str | Path) -> GenerationBundle:
    """``(logits_fn, VocabLayout, tokenizers, cfg)`` of a generation checkpoint directory."""
    from megadiff.generation.adapters import reference_logits_fn
    from megadiff.model.reference import ReferenceConfig, ReferenceModel

    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory '{ckpt}' does not exist")
    for name in ("config.yaml", "model.pt"):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"checkpoint '{ckpt}' has no {name}")
    cfg = config_from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
    vocab_path = ckpt / "vocab.json"
    if not vocab_path.is_file() and cfg.data.vocab:
        vocab_path = Path(cfg.data.vocab)
    if not vocab_path.is_file():
        raise CheckpointError(f"checkpoint '{ckpt}' has no vocab.json (nor data.vocab)")
    vocab = VocabLayout.from_json(vocab_path)
    if cfg.model.vocab_size != vocab.vocab_size:
        raise CheckpointError(
            f"checkpoint '{ckpt}': model.vocab_size {cfg.model.vocab_size} != vocab layout's "
            f"{vocab.vocab_size}"
        )
    model = ReferenceModel(ReferenceConfig.from_model_config(cfg.model))
    state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    fn = reference_logits_fn(model, vocab.pad_id, vocab.vocab_size)
    return GenerationBundle(fn, vocab, load_tokenizers(ckpt, cfg), cfg, str(ckpt))
