"""Read any megadiff checkpoint's model as full tensors in one process (export, generation).

Whatever TP/PP/VPP layout (or engine) saved it, the model is rebuilt at TP = PP = 1 and
megatron-core's ``dist_checkpointing`` reshards the saved weights into it.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from megadiff.checkpoint_files import CheckpointError, resolve_any
from megadiff.model.gather import unwrap

# megatron-core's sharded-state metadata: distributed-optimizer shards in the layout-free
# format, so any TP/PP/DP layout can load them
SHARDED_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}


def model_sharded_state(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """The model chunks' part of a checkpoint: ``{"model<i>": sharded state dict}``."""
    return {
        f"model{i}": unwrap(m).sharded_state_dict(metadata=dict(SHARDED_METADATA))
        for i, m in enumerate(chunks)
    }


def load_sharded(state: dict[str, Any], path: Path, what: str) -> dict[str, Any]:
    """``dist_checkpointing.load`` with its failures as :class:`CheckpointError`."""
    from megatron.core import dist_checkpointing

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch DCP's ShardedTensor notices
            return dist_checkpointing.load(state, str(path))
    except (Exception, CheckpointException) as e:  # torch's CheckpointException: BaseException
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {what}checkpoint {path}: {last}") from e


@dataclass
class CheckpointModel:
    """A checkpoint's model as full tensors (global names, any saved layout), with its config."""

    path: Path
    cfg: Any  # megadiff.config.Config
    params: dict[str, torch.Tensor]
    vocab: dict | None
    meta: dict


def read_checkpoint_model(path: str | os.PathLike, checksums: bool = True) -> CheckpointModel:
    """Load a checkpoint's weights into one process, whatever layout saved them.

    ``path``: a checkpoint directory, a directory of checkpoints or a run directory (newest
    valid wins). Uses the existing process group, or a one-process group of its own. Raises
    :class:`CheckpointError` naming the path or file when it is not a usable checkpoint.
    """
    from megadiff.config import config_from_dict
    from megadiff.model.build import build_model
    from megadiff.model.gather import full_tensors
    from megadiff.parallel.state import set_single_process_layout, single_process_group

    ckpt = resolve_any(path, checksums)
    try:
        cfg = config_from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
        meta = json.loads((ckpt / "meta.json").read_text())
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt}: unreadable config.yaml/meta.json: {e}") from e
    set_single_process_layout(cfg)
    if not torch.cuda.is_available():  # a run trained in bf16/fp8 on GPUs, read on a CPU box
        cfg.train.precision = "fp32"
    with single_process_group(cfg):
        chunks = build_model(cfg)
        state = load_sharded(model_sharded_state(chunks), ckpt, "the model of ")
        for i, m in enumerate(chunks):
            m.load_state_dict(state[f"model{i}"], strict=True)
        params = full_tensors(chunks, "param")
    vocab_file = ckpt / "vocab.json"
    vocab = json.loads(vocab_file.read_text()) if vocab_file.is_file() else None
    return CheckpointModel(path=ckpt, cfg=cfg, params=params, vocab=vocab, meta=meta)
