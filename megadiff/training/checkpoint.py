"""Training checkpoints from stateful pieces: what a run saves, and how it resumes.

The trainer hands a :class:`Checkpointer` its engine and the objects with
``state_dict()/load_state_dict()`` that make up a run's state: the lr scheduler and the
progress counters (the same on every rank), the data source (per DP rank) and this process's
RNGs. A checkpoint directory (files handled by :mod:`megadiff.checkpoint_files`) holds

* megatron-core ``dist_checkpointing`` files (``*.distcp``, ``.metadata``, ``common.pt``,
  ``metadata.json``): the model chunks and, for the megatron-core engine, the optimizer
  (distributed-optimizer shards in the ``fully_reshardable`` format, so any TP/PP/DP layout can
  load them), plus the scheduler and counters;
* files the engine keeps itself (DeepSpeed: ``deepspeed/``, its optimizer partitions);
* ``rank_<r>.pt`` per global rank: RNG states and that rank's data-source state;
  ``data_state.pt``: every DP rank's data-source state;
* ``config.yaml`` (the resolved config), ``meta.json`` (step, tokens, engine, layout),
  ``vocab.json`` (the data's vocabulary layout; synthetic data has one too) and ``tokenizers/``
  (the tokenizer files named by the streams' manifests, a synthetic run's byte-level text
  tokenizer; see :mod:`megadiff.data.tokenizers.files`);
* ``manifest.json``, written last.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.api import CheckpointException as DCPError

from megadiff import checkpoint_files as files
from megadiff.checkpoint_files import CheckpointError
from megadiff.config import dump_config
from megadiff.data.tokenizers.files import copy_tokenizers
from megadiff.model.reader import load_sharded
from megadiff.parallel.state import Ranks
from megadiff.training.engine import Engine
from megadiff.training.faults import stop_signals_blocked


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RNGState:
    """This process's RNGs: python, numpy, torch (CPU, CUDA) and megatron-core's tracker."""

    def state_dict(self) -> dict[str, Any]:
        from megatron.core import tensor_parallel

        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from megatron.core import tensor_parallel

        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Restored:
    path: Path
    step: int
    tokens: int
    same_layout: bool


SHAPE_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "vocab_size",
    "vocab_pad_multiple",
    "qk_layernorm",
    "normalization",
)


def check_compatible(path: Path, cfg, optimizer: bool) -> None:
    """What the checkpoint's config alone shows it cannot give this run (read before any model
    is built): another model shape, or (with ``optimizer``) another optimizer-state format."""
    saved = yaml.safe_load((path / "config.yaml").read_text())
    check_model_shape(path, cfg, saved)
    if optimizer:
        check_distributed_optimizer(path, cfg, saved)


def check_distributed_optimizer(path: Path, cfg, saved: dict) -> None:
    """megatron-core's distributed and plain optimizers store their state differently: the
    checkpoint's ``parallel.distributed_optimizer`` must be this run's to load it."""
    engines = {saved.get("train", {}).get("engine", "megatron"), cfg.train.engine}
    there = saved.get("parallel", {}).get("distributed_optimizer")
    here = cfg.parallel.distributed_optimizer
    if engines != {"megatron"} or there is None or there == here:
        return
    raise CheckpointError(
        f"cannot load the optimizer state of checkpoint {path}: it was saved with "
        f"parallel.distributed_optimizer={str(there).lower()}, this run has "
        f"{str(here).lower()}; set parallel.distributed_optimizer={str(there).lower()}, or "
        "start from its weights with checkpoint.load=<it> checkpoint.load_optimizer=false (and "
        "a fresh run.dir)"
    )


def check_model_shape(path: Path, cfg, saved_cfg: dict | None = None) -> None:
    """Name the ``model.*`` keys whose values differ from the checkpoint's (they change shapes)."""
    if saved_cfg is None:
        saved_cfg = yaml.safe_load((path / "config.yaml").read_text())
    saved = saved_cfg.get("model", {})
    ours = cfg.to_dict()["model"]
    diffs = [
        f"model.{k}={saved.get(k)!r} there, {ours[k]!r} here"
        for k in SHAPE_KEYS
        if k in saved and saved[k] != ours[k]
    ]
    if diffs:
        raise CheckpointError(f"checkpoint {path} has another model shape: " + "; ".join(diffs))


class AsyncSaver:
    """Background checkpoint writes (``checkpoint.async_save``): megatron-core's async queue.

    Tensors are written by a forked process while training goes on; the manifest and the
    rename happen when the write is finalized, which every rank does together in
    :meth:`poll` (called after each step) or :meth:`wait`.
    """

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)

    def submit(self, request: Any) -> None:
        self.wait()  # one save in flight at a time
        with stop_signals_blocked():  # the forked writer ignores stop signals
            self.queue.schedule_async_request(request)

    def busy(self) -> bool:
        """A save is written or not yet finalized."""
        return bool(self.queue.get_num_unfinalized_calls())

    def poll(self) -> None:
        """Collective when a save is pending: finalize it if every rank's writer is done."""
        if self.busy():
            self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Collective: block until every pending save is complete and renamed."""
        if self.busy():
            self.queue.maybe_finalize_async_calls(blocking=True)


class Checkpointer:
    """Saves and restores one run's state.

    ``shared``: pieces whose state is the same on every rank (saved once, in the
    ``dist_checkpointing`` common state); ``source``: the data source (state per DP rank);
    ``vocab``: the vocabulary layout to record (or None).
    """

    def __init__(
        self,
        cfg,
        ranks: Ranks,
        engine: Engine,
        shared: dict[str, Stateful],
        source: Stateful,
        vocab: Any = None,
    ) -> None:
        self.cfg = cfg
        self.ranks = ranks
        self.engine = engine
        self.shared = shared
        self.source = source
        self.vocab = vocab
        self.rng = RNGState()
        self.root = files.checkpoint_root(cfg)
        self.saver = AsyncSaver() if cfg.checkpoint.async_save else None
        self.pending: tuple[Path, int] | None = None  # the background save: (tmp dir, step)
        self.saved_step: int | None = None

    # ------------------------------------------------------------------ save

    def save(self, step: int, tokens: int) -> Path | None:
        """Collective: checkpoint ``step`` atomically (once per step); prune old ones.

        A full disk raises :class:`CheckpointError` naming the directory, the space needed and
        the space left; the partial save is removed and earlier checkpoints stay as they were.
        """
        if self.saved_step == step:
            return None
        t0 = time.perf_counter()
        self.wait()
        tmp, final = files.start_tmp(self.root, step)
        with self._disk_full_named(tmp, step):
            self._write(tmp, final, step, tokens, t0)
        self.saved_step = step
        return final

    @contextlib.contextmanager
    def _disk_full_named(self, tmp: Path, step: int) -> Iterator[None]:
        """Turn a write of ``step`` into ``tmp`` that ran out of space into the
        :class:`CheckpointError` of :meth:`_disk_full` (other errors pass unchanged)."""
        try:
            yield
        except (Exception, DCPError) as e:  # DCPError is a BaseException
            if files.is_disk_full(e, self.root, files.estimated_checkpoint_bytes(self.cfg)):
                raise self._disk_full(tmp, step) from e
            raise

    def _write(self, tmp: Path, final: Path, step: int, tokens: int, t0: float) -> None:
        """Write the state into ``tmp`` and publish it as ``final`` (at once, or when the
        background write is finalized)."""
        from megatron.core import dist_checkpointing

        with (
            self.engine.full_weights(modify=False),
            warnings.catch_warnings(),
            stop_signals_blocked(),  # the writer processes it starts ignore stop signals
        ):
            warnings.simplefilter("ignore", FutureWarning)
            state = self.engine.sharded_state(is_loading=False, optimizer=True)
            state.update({name: piece.state_dict() for name, piece in self.shared.items()})
            request = dist_checkpointing.save(
                state, str(tmp), async_sharded_save=self.saver is not None
            )
        self.engine.save_files(tmp)
        self._save_process_state(tmp, step, tokens)

        def finish() -> None:
            files.publish(tmp, final, step, self.cfg.checkpoint.keep)
            files.log_rank0(f"saved checkpoint {final} ({time.perf_counter() - t0:.1f}s)")

        if self.saver is None:
            finish()
        else:
            request.add_finalize_fn(finish)
            self.saver.submit(request)
            self.pending = (tmp, step)

    def _disk_full(self, tmp: Path, step: int) -> CheckpointError:
        """Remove the partial save ``tmp``; the error that names what is needed and left."""
        shutil.rmtree(tmp, ignore_errors=True)
        need = files.human_bytes(files.estimated_checkpoint_bytes(self.cfg))
        have = files.human_bytes(shutil.disk_usage(self.root).free)
        earlier = files.list_checkpoints(self.root)
        kept = f"{earlier[-1][1]} is untouched" if earlier else "there is no earlier checkpoint"
        return CheckpointError(
            f"no space left on {self.root} while saving step {step} (need ~{need}, have {have} "
            f"once the partial save is removed); {kept}; free space there or point "
            "checkpoint.dir elsewhere, then run the same command again"
        )

    def _save_process_state(self, tmp: Path, step: int, tokens: int) -> None:
        """Per-rank RNG and data state; on rank 0 the run's description."""
        source_state = self.source.state_dict()
        torch.save(
            {"rng": self.rng.state_dict(), "source": source_state, "dp_rank": self.ranks.dp_rank},
            tmp / f"rank_{self.ranks.rank:05d}.pt",
        )
        data_state = _data_state_by_dp_rank(self.ranks.dp_rank, source_state)
        if self.ranks.rank != 0:
            return
        torch.save(data_state, tmp / "data_state.pt")
        (tmp / "config.yaml").write_text(dump_config(self.cfg))
        meta = {
            "step": step,
            "tokens": tokens,
            "engine": self.engine.name,
            "layout": self.engine.layout(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if self.vocab is not None:
            (tmp / "vocab.json").write_text(json.dumps(self.vocab.to_dict(), indent=1))
        copy_tokenizers(self.cfg, tmp)

    def poll(self) -> None:
        """Collective: publish a finished background save (a full disk: CheckpointError)."""
        if self.saver is not None and self.pending is not None:
            pending, self.pending = self.pending, None
            with self._disk_full_named(*pending):
                self.saver.poll()
            if self.saver.busy():
                self.pending = pending

    def wait(self) -> None:
        """Collective: finish the background save (a full disk: CheckpointError)."""
        if self.saver is not None and self.pending is not None:
            pending, self.pending = self.pending, None
            with self._disk_full_named(*pending):
                self.saver.wait()

    # ------------------------------------------------------------------ load

    def load(self, path: Path, optimizer: bool = True, counters: bool = True) -> Restored:
        """Collective: restore from ``path`` (any TP/PP/DP layout for the model).

        ``optimizer=False`` keeps the fresh optimizer; ``counters=False`` keeps the shared
        pieces (step, tokens, scheduler) at their start and the RNG/data state fresh (a new run
        from these weights).
        """
        meta = json.loads((path / "meta.json").read_text())
        check_compatible(path, self.cfg, optimizer)
        if optimizer:
            self._check_optimizer_compatible(path, meta)
        with self.engine.full_weights(modify=True):
            state = self.engine.sharded_state(is_loading=True, optimizer=optimizer)
            state.update({name: piece.state_dict() for name, piece in self.shared.items()})
            loaded = load_sharded(state, path, "")
            self.engine.load_sharded_state(loaded, optimizer)
        self.engine.load_files(path, optimizer)
        same_layout = meta["layout"] == self.engine.layout()
        if counters:
            for name, piece in self.shared.items():
                piece.load_state_dict(loaded[name])
            self._restore_process_state(path, meta, same_layout)
        if self.ranks.world > 1:
            dist.barrier()
        c = loaded["counters"] if counters else {"step": 0, "tokens": 0}
        return Restored(path, int(c["step"]), int(c["tokens"]), same_layout)

    def _check_optimizer_compatible(self, path: Path, meta: dict) -> None:
        """The optimizer state of another engine, or DeepSpeed's at another DP size or ZeRO
        stage, cannot be loaded: say which key lets the run start from the weights alone."""
        engine = meta.get("engine", "megatron")
        why = None
        if engine != self.engine.name:
            why = f"it was written by the {engine} engine, this run uses {self.engine.name}"
        elif self.engine.optimizer_needs_same_layout and meta["layout"] != self.engine.layout():
            why = (
                f"the {engine} engine's optimizer state was saved at layout {meta['layout']}, "
                f"this run has {self.engine.layout()}"
            )
        if why:
            raise CheckpointError(
                f"cannot load the optimizer state of checkpoint {path}: {why}; start from its "
                "weights with checkpoint.load=<it> checkpoint.load_optimizer=false (and a fresh "
                "run.dir), or go on with the layout and engine it was saved with"
            )

    def _restore_process_state(self, path: Path, meta: dict, same_layout: bool) -> None:
        """Same layout: this rank's RNG and data state. Same DP size: its DP rank's data state.

        RNG streams are per rank and do not carry over to another layout (training noise is
        keyed by (seed, step, DP rank, micro-batch), so this does not change the losses). A data
        position saved at another DP size cannot be mapped: the loader then starts afresh, and
        every rank says so.
        """
        rank_file = path / f"rank_{self.ranks.rank:05d}.pt"
        if same_layout and rank_file.is_file():
            own = torch.load(rank_file, weights_only=False)
            self.rng.load_state_dict(own["rng"])
            self.source.load_state_dict(own["source"])
            return
        by_dp = torch.load(path / "data_state.pt", weights_only=False)
        saved_dp = meta["layout"]["dp"]
        if saved_dp == self.ranks.dp:
            self.source.load_state_dict(by_dp[self.ranks.dp_rank])
        elif any(by_dp.values()):
            print(
                f"megadiff: rank {self.ranks.rank}: data position NOT restored: {path} was "
                f"saved with DP={saved_dp}, this run has DP={self.ranks.dp} (the loader state "
                "is per DP rank); the data loader starts from its beginning",
                flush=True,
            )


def _data_state_by_dp_rank(dp_rank: int, state: dict) -> dict[int, dict]:
    """Collective: each DP rank's data-source state (a non-empty one wins: readers hold it)."""
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (dp_rank, state))
    out: dict[int, dict] = {}
    for r, st in parts:
        if st or r not in out:
            out[r] = st
    return out
