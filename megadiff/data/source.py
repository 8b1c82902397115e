"""The trainer's view of data: per-step micro-batches for this DP rank, on every rank.

``synthetic``: the built-in token source, computed on each rank (a pure function of the step).
``mds``: the streaming mixture loader, read once per DP replica (model-parallel rank 0, i.e.
TP rank 0 of the first pipeline stage) and broadcast over the replica's model-parallel group,
so every TP rank and every pipeline stage of a replica gets the same batch. Every rank learns
whether all readers read their step (one flag all-reduced per step): when one could not, all
raise :class:`~megadiff.data.checks.UnreadableBatch` together, with the loaders back at the
step's start, instead of the others waiting for a batch that never comes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megadiff.config import Config
from megadiff.data.synthetic import SyntheticSource

# prompt: known prompt lengths (0 = none); source: each row's stream index
BATCH_KEYS = ("tokens", "modality", "prompt", "source")


class LoaderSource:
    """Adapts :class:`megadiff.data.loader.MixtureLoader` to the trainer's interface."""

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, device: torch.device) -> None:
        from megatron.core import parallel_state as ps

        from megadiff.data.loader import from_config

        self.group = ps.get_model_parallel_group()
        self.is_reader = dist.get_rank(self.group) == 0
        self.device = device
        self.shape = (cfg.train.micro_batch, cfg.model.seq_length)
        self.loader = (
            from_config(
                cfg.data,
                cfg.model.seq_length,
                cfg.train.micro_batch,
                dp_rank,
                dp_size,
                cfg.train.seed,
            )
            if self.is_reader
            else None
        )
        from megadiff.data.vocab import resolve_layout

        self.vocab = (
            self.loader.vocab
            if self.loader
            else resolve_layout(cfg.data.vocab, [(s.name, s.path) for s in cfg.data.streams])
        )
        self.mask_id = self.vocab.mask_id
        self.pad_id = self.vocab.pad_id

    def ranges_array(self):
        return self.vocab.ranges_array()

    def _read(self, n_micro: int) -> tuple[list, Exception | None]:
        """This reader's ``n_micro`` batches (``None`` on other ranks), or the data error that
        stopped it."""
        from megadiff.data.checks import DATA_ERRORS

        if self.loader is None:
            return [None] * n_micro, None
        try:
            return [next(self.loader) for _ in range(n_micro)], None
        except DATA_ERRORS as e:
            return [None] * n_micro, e

    def microbatches(
        self, step: int, global_batch: int, micro_batch: int, dp_rank: int, n_micro: int
    ) -> list[dict[str, Tensor]]:
        from megadiff.data.checks import UnreadableBatch
        from megadiff.data.loader import share_batch

        start = self.loader.state_dict() if self.loader else None
        batches, error = self._read(n_micro)
        try:
            raise_if_any_failed(error)
        except UnreadableBatch:
            if self.loader:  # every reader back at the step's start: a checkpoint resumes it
                self.loader.load_state_dict(start)
            raise
        device = self.device if dist.get_backend(self.group) == "nccl" else "cpu"
        out = []
        for mb, batch in enumerate(batches):
            shared = share_batch(batch, *self.shape, device=device)
            out.append({**{k: shared[k] for k in BATCH_KEYS}, "microbatch": mb})
        return out

    def skipped_samples(self) -> int:
        """Collective: the bad samples skipped so far by the readers of all DP replicas
        (``data.on_bad_sample=skip``)."""
        device = self.device if dist.get_backend() == "nccl" else "cpu"
        n = torch.tensor([self.loader.skipped if self.loader else 0], device=device)
        dist.all_reduce(n)
        return int(n.item())

    def state_dict(self) -> dict:
        return self.loader.state_dict() if self.loader else {}

    def load_state_dict(self, state: dict) -> None:
        if self.loader and state:
            self.loader.load_state_dict(state)


def raise_if_any_failed(error: Exception | None) -> None:
    """Collective: raise :class:`UnreadableBatch` on every rank when any rank's ``error`` is
    set (the messages are gathered only then)."""
    from megadiff.data.checks import UnreadableBatch
    from megadiff.parallel.state import device

    world = dist.get_world_size() if dist.is_initialized() else 1
    flag = torch.tensor([int(error is not None)], dtype=torch.int32, device=device())
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag.item()):
        return
    own = None if error is None else str(error)
    messages = [own] * world
    if world > 1:
        dist.all_gather_object(messages, own)
    rank = next(r for r, m in enumerate(messages) if m is not None)
    raise UnreadableBatch(own, rank, messages[rank])


def build_source(cfg: Config, dp_rank: int, dp_size: int, device: torch.device):
    if cfg.data.source == "synthetic":
        return SyntheticSource(cfg.model.vocab_size, cfg.model.seq_length, cfg.train.seed)
    return LoaderSource(cfg, dp_rank, dp_size, device)
