"""Distributed checkpoints: save, verify, find the newest valid one, load (with resharding), prune.

A checkpoint is a directory ``<checkpoint.dir>/step_<00000042>/`` holding

* megatron-core ``dist_checkpointing`` files (``*.distcp``, ``.metadata``, ``common.pt``,
  ``metadata.json``): model chunks, optimizer (distributed-optimizer shards in the
  ``fully_reshardable`` format, so any TP/PP/DP layout can load them), scheduler,
  counters and data-source state;
* ``rank_<r>.pt`` per global rank: torch/numpy/python RNG states, megatron's CUDA-RNG-tracker
  states and that rank's data-source state;
* ``config.yaml`` (the full resolved config), ``meta.json`` (step, tokens, layout),
  ``vocab.json`` when the data source has a vocabulary layout, and ``tokenizers/`` (the text,
  image and audio tokenizer files named by the streams' manifests; see
  :mod:`megadiff.data.tokenizers.files`);
* ``manifest.json``, written last: every other file with its size and SHA-256.

It is written to ``.tmp_step_<n>/`` and renamed when complete, so a crash leaves either a
complete checkpoint or a ``.tmp_`` directory that is never loaded (and removed by the next save).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from megadiff.config import dump_config
from megadiff.data.tokenizers.files import copy_tokenizers

if TYPE_CHECKING:
    from megadiff.training.trainer import Trainer

MANIFEST = "manifest.json"
FORMAT = "megadiff-checkpoint-1"
_NAME = re.compile(r"^step_(\d+)$")
_OPT_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path or file."""


def checkpoint_root(cfg) -> Path:
    return Path(cfg.checkpoint.dir or os.path.join(cfg.run.dir, "checkpoints"))


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def log_rank0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"megadiff: {msg}", flush=True)


# ----------------------------------------------------------------------------- manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _payload_files(ckpt: Path) -> list[str]:
    return sorted(
        str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def _hash_distributed(ckpt: Path, files: list[str]) -> dict[str, str]:
    """SHA-256 of ``files``, the work split round-robin over all ranks (shared file system)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {f: _sha256(ckpt / f) for f in files[rank::world] if (ckpt / f).is_file()}
    if world == 1:
        return mine
    parts: list[dict[str, str] | None] = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for p in parts for k, v in (p or {}).items()}


def write_manifest(ckpt: Path, step: int) -> None:
    """Collective: hash every file of ``ckpt``; rank 0 writes ``manifest.json`` last."""
    files = _payload_files(ckpt) if _rank() == 0 else []
    files = _broadcast(files)
    digests = _hash_distributed(ckpt, files)
    if _rank() == 0:
        entries = {f: {"size": (ckpt / f).stat().st_size, "sha256": digests[f]} for f in files}
        manifest = {"format": FORMAT, "step": step, "time": time.time(), "files": entries}
        tmp = ckpt / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        _fsync(tmp)
        tmp.rename(ckpt / MANIFEST)


def verify(ckpt: Path, checksums: bool = True) -> str | None:
    """Why ``ckpt`` is not a complete checkpoint (naming the bad file), or None if it is.

    Sizes are always checked; SHA-256 too when ``checksums`` (collective when distributed:
    every rank must call it).
    """
    problem = _verify_sizes(ckpt)
    files: list[str] = []
    if problem is None and checksums:
        files = sorted(json.loads((ckpt / MANIFEST).read_text())["files"])
    if dist.is_initialized():
        problem, files = _broadcast((problem, files))
    if problem is not None or not checksums:
        return problem
    expected = json.loads((ckpt / MANIFEST).read_text())["files"]
    digests = _hash_distributed(ckpt, files)
    for f in files:
        if digests.get(f) != expected[f]["sha256"]:
            return f"file {ckpt / f} does not match its SHA-256 in {MANIFEST} (corrupt)"
    return None


def _verify_sizes(ckpt: Path) -> str | None:
    if not ckpt.is_dir():
        return f"{ckpt} is not a directory"
    mpath = ckpt / MANIFEST
    if not mpath.is_file():
        return f"{mpath} is missing (not a megadiff checkpoint, or an incomplete one)"
    try:
        manifest = json.loads(mpath.read_text())
        entries = manifest["files"]
        assert manifest.get("format") == FORMAT
    except Exception:  # noqa: BLE001 - any parse problem makes the manifest unusable
        return f"{mpath} is not a valid {FORMAT} manifest"
    for f, e in sorted(entries.items()):
        p = ckpt / f
        if not p.is_file():
            return f"file {p} is missing"
        size = p.stat().st_size
        if size != e["size"]:
            return f"file {p} has {size} bytes, {MANIFEST} says {e['size']} (truncated or corrupt)"
    return None


# ----------------------------------------------------------------------------- discovery


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Completed (renamed) checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def find_latest_valid(root: Path, checksums: bool = True) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; bad ones are reported and skipped."""
    for _, path in reversed(_broadcast(list_checkpoints(root))):
        problem = verify(path, checksums)
        if problem is None:
            return path
        log_rank0(f"checkpoint {path.name} is unusable, skipping it: {problem}")
    return None


def resolve_load_path(path: str | os.PathLike, checksums: bool = True) -> Path:
    """``checkpoint.load``: a checkpoint directory, or a directory of them (newest valid wins).

    Raises :class:`CheckpointError` naming the path or bad file.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint.load={path}: no such file or directory")
    if not (p / MANIFEST).exists() and list_checkpoints(p):
        latest = find_latest_valid(p, checksums)
        if latest is None:
            raise CheckpointError(f"checkpoint.load={path}: no valid checkpoint in this directory")
        return latest
    problem = verify(p, checksums)
    if problem is not None:
        raise CheckpointError(f"checkpoint.load={path} is not a usable checkpoint: {problem}")
    return p


def resume_source(cfg) -> tuple[Path, bool] | None:
    """Collective: what to start from, ``(path, own_run)``, or None for a fresh start.

    The newest valid checkpoint of this run wins (a restart); otherwise ``checkpoint.load``.
    """
    c = cfg.checkpoint
    if c.resume:
        latest = find_latest_valid(checkpoint_root(cfg), c.checksums)
        if latest is not None:
            return latest, True
    if c.load:
        return resolve_load_path(c.load, c.checksums), False
    return None


def preflight(cfg) -> None:
    """Cheap check of ``checkpoint.load`` (sizes only, no process group) before any set-up.

    Skipped when this run already has checkpoints (a restart resumes from those instead).
    """
    c = cfg.checkpoint
    if c.load and not (c.resume and list_checkpoints(checkpoint_root(cfg))):
        resolve_load_path(c.load, checksums=False)


# ----------------------------------------------------------------------------- state


def _unwrap(m: torch.nn.Module) -> torch.nn.Module:
    while hasattr(m, "module"):
        m = m.module
    return m


def _model_sharded(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    return {
        f"model{i}": _unwrap(m).sharded_state_dict(metadata=dict(_OPT_METADATA))
        for i, m in enumerate(chunks)
    }


def _torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer for o in chained]


@torch.no_grad()
def init_optimizer_state(optimizer: Any) -> None:
    """Give every parameter Adam's state (zeros, step 0) so a fresh optimizer can be loaded into.

    megatron-core's own init hook leaves out ``step``, which torch's Adam needs when neither
    Transformer Engine nor apex provides a fused Adam (CPU boxes).
    """
    for opt in _torch_optimizers(optimizer):
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue  # fused Adams (TE/apex) keep their step elsewhere; megatron-core inits them
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state[p]
                if len(st) == 0:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@contextlib.contextmanager
def _keep_adam_step(optimizer: Any):
    """Work around megatron-core 0.16.1 loading ``fully_reshardable`` state into torch's Adam.

    Without Transformer Engine / apex, the distributed optimizer restores Adam's ``step`` from
    the param groups as *one* tensor shared by every parameter (torch's Adam then increments it
    once per parameter per step), and then copies every per-parameter state key, ``step``
    included, from a source that has none (KeyError). Here a missing ``step`` is copied onto
    itself, and each parameter gets its own ``step`` tensor afterwards.
    """
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None:
            continue

        def fixed(model_param, tensors, _opt=opt, _orig=setter):
            if "step" not in tensors:
                gi, go = _opt.model_param_group_index_map[model_param]
                st = _opt.optimizer.state[_opt.optimizer.param_groups[gi]["params"][go]]
                if "step" in st:
                    tensors = {**tensors, "step": st["step"].clone()}
            _orig(model_param, tensors)

        opt._set_main_param_and_optimizer_states = fixed
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
        for opt in _torch_optimizers(optimizer):
            for st in opt.state.values():
                if "step" in st:
                    st["step"] = st["step"].detach().clone()


def sharded_state(trainer: Trainer, is_loading: bool, optimizer: bool = True) -> dict[str, Any]:
    """What ``dist_checkpointing`` saves/loads: model chunks, optimizer, counters."""
    model_sd = _model_sharded(trainer.model)
    state: dict[str, Any] = dict(model_sd)
    if optimizer:
        init_optimizer_state(trainer.optimizer)
        state["optimizer"] = trainer.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=dict(_OPT_METADATA)
        )
    state["scheduler"] = trainer.scheduler.state_dict()
    state["counters"] = trainer.counters()
    return state


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _layout(trainer: Trainer) -> dict[str, int]:
    r = trainer.ranks
    vpp = trainer.cfg.parallel.virtual_pipeline or 1
    return {"world": r.world, "tp": r.tp, "pp": r.pp, "dp": r.dp, "vpp": vpp}


# ----------------------------------------------------------------------------- save


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
        self.queue.schedule_async_request(request)

    def poll(self) -> None:
        """Collective when a save is pending: finalize it if every rank's writer is done."""
        if self.queue.get_num_unfinalized_calls():
            self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Collective: block until every pending save is complete and renamed."""
        if self.queue.get_num_unfinalized_calls():
            self.queue.maybe_finalize_async_calls(blocking=True)


def save_checkpoint(trainer: Trainer, saver: AsyncSaver | None = None) -> Path:
    """Collective: write the checkpoint of ``trainer``'s current step atomically; prune old ones.

    With ``saver`` the tensor files are written in the background and the checkpoint appears
    (renamed from ``.tmp_step_N``) when ``saver`` finalizes it.
    """
    from megatron.core import dist_checkpointing

    cfg = trainer.cfg
    root = checkpoint_root(cfg)
    name = checkpoint_name(trainer.step)
    final, tmp = root / name, root / f".tmp_{name}"
    t0 = time.perf_counter()
    if saver is not None:
        saver.wait()
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        request = dist_checkpointing.save(
            sharded_state(trainer, is_loading=False),
            str(tmp),
            async_sharded_save=saver is not None,
        )
    source_state = trainer.source.state_dict()
    torch.save(
        {"rng": rng_state(), "source": source_state, "dp_rank": trainer.ranks.dp_rank},
        tmp / f"rank_{trainer.ranks.rank:05d}.pt",
    )
    data_state = _data_state_by_dp_rank(trainer.ranks.dp_rank, source_state)
    if _rank() == 0:
        torch.save(data_state, tmp / "data_state.pt")
        (tmp / "config.yaml").write_text(dump_config(cfg))
        meta = {"step": trainer.step, "tokens": trainer.tokens, "layout": _layout(trainer)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        vocab = _vocab_layout(trainer.source)
        if vocab is not None:
            (tmp / "vocab.json").write_text(json.dumps(vocab, indent=1))
        copy_tokenizers(cfg, tmp)

    def finish() -> None:
        dist.barrier()
        write_manifest(tmp, int(name[5:]))
        if _rank() == 0:
            if final.exists():  # an unusable checkpoint of this step (it was skipped): set aside
                aside = root / f"{name}.bad-{int(time.time())}"
                final.rename(aside)
                log_rank0(f"moved the unusable {final} to {aside} (delete it by hand)")
            tmp.rename(final)
            _fsync(root)
            prune(root, cfg.checkpoint.keep)
        dist.barrier()
        log_rank0(f"saved checkpoint {final} ({time.perf_counter() - t0:.1f}s)")

    if saver is None:
        finish()
    else:
        request.add_finalize_fn(finish)
        saver.submit(request)
    return final


def _data_state_by_dp_rank(dp_rank: int, state: dict) -> dict[int, dict]:
    """Collective: each DP rank's data-source state (a non-empty one wins: readers hold it)."""
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (dp_rank, state))
    out: dict[int, dict] = {}
    for r, st in parts:
        if st or r not in out:
            out[r] = st
    return out


def _vocab_layout(source: Any) -> dict | None:
    layout = getattr(source, "vocab", None)
    return layout.to_dict() if hasattr(layout, "to_dict") else None


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints; remove older ones and stale temporary directories."""
    for p in root.glob(".tmp_step_*"):
        shutil.rmtree(p, ignore_errors=True)
    ckpts = list_checkpoints(root)
    for _, path in ckpts[: max(len(ckpts) - keep, 0)]:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- load


@dataclass
class Restored:
    path: Path
    step: int
    tokens: int
    same_layout: bool


def load_checkpoint(
    trainer: Trainer, path: Path, optimizer: bool = True, counters: bool = True
) -> Restored:
    """Collective: restore ``trainer`` from ``path`` (any TP/PP/DP layout).

    ``optimizer=False`` keeps the fresh optimizer; ``counters=False`` keeps step/tokens/scheduler
    at zero (a new run starting from these weights).
    """
    from megatron.core import dist_checkpointing

    meta = json.loads((path / "meta.json").read_text())
    _check_model_shape(path, trainer.cfg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch DCP's ShardedTensor notices
            state = dist_checkpointing.load(
                sharded_state(trainer, is_loading=True, optimizer=optimizer), str(path)
            )
    except (Exception, CheckpointException) as e:  # torch's CheckpointException: BaseException
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {last}") from e
    for i, m in enumerate(trainer.model):
        _unwrap(m).load_state_dict(state[f"model{i}"], strict=True)
    if optimizer:
        # the learning-rate range of each group comes from this run's config, not the checkpoint
        # (megatron's param groups carry max_lr/min_lr, which its scheduler reads)
        lr_range = [
            {k: g[k] for k in ("max_lr", "min_lr") if k in g}
            for g in trainer.optimizer.param_groups
        ]
        with _keep_adam_step(trainer.optimizer):
            trainer.optimizer.load_state_dict(state["optimizer"])
        for g, kv in zip(trainer.optimizer.param_groups, lr_range, strict=True):
            g.update(kv)
    else:
        trainer.optimizer.reload_model_params()  # main (fp32) params <- loaded weights
    same_layout = meta["layout"] == _layout(trainer)
    step, tokens = 0, 0
    if counters:
        c = state["counters"]
        step, tokens = c["step"], c["tokens"]
        trainer.load_counters(c)
        # the schedule's shape comes from the config, its progress from the checkpoint
        trainer.scheduler.override_opt_param_scheduler = True
        trainer.scheduler.load_state_dict(state["scheduler"])
        _restore_rng_and_data(trainer, path, meta, same_layout)
    dist.barrier()
    return Restored(path=path, step=step, tokens=tokens, same_layout=same_layout)


@dataclass
class CheckpointModel:
    """A checkpoint's model as full tensors (global names, any saved layout), with its config."""

    path: Path
    cfg: Any  # megadiff.config.Config
    params: dict[str, torch.Tensor]
    vocab: dict | None
    meta: dict


def read_checkpoint_model(path: str | os.PathLike, checksums: bool = True) -> CheckpointModel:
    """Load a checkpoint's weights into one process, whatever TP/PP/VPP layout saved them.

    ``path``: a checkpoint directory or a run's checkpoint directory (newest valid wins).
    Builds the model at TP = PP = 1 in a one-process group (created here and destroyed again
    unless one already exists) and lets ``dist_checkpointing`` reshard. Raises
    :class:`CheckpointError` naming the path or file when it is not a usable checkpoint.
    """
    from megatron.core import dist_checkpointing

    from megadiff.config import config_from_dict
    from megadiff.model.build import build_model
    from megadiff.model.gather import full_tensors
    from megadiff.parallel.env import LaunchEnv
    from megadiff.parallel.state import destroy_distributed, init_distributed

    p = Path(path)
    if p.exists() and not (p / MANIFEST).exists() and (p / "checkpoints").is_dir():
        p = p / "checkpoints"  # a run directory
    if p.exists() and not (p / MANIFEST).exists() and not list_checkpoints(p):
        raise CheckpointError(
            f"{path} is not a megadiff checkpoint (no {MANIFEST}, no step_* checkpoints in it)"
        )
    ckpt = resolve_load_path(p, checksums)
    try:
        cfg = config_from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
        meta = json.loads((ckpt / "meta.json").read_text())
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt}: unreadable config.yaml/meta.json: {e}") from e
    cfg.parallel.tensor_parallel = cfg.parallel.pipeline_parallel = 1
    cfg.parallel.virtual_pipeline = None
    cfg.parallel.sequence_parallel = False
    own_group = not dist.is_initialized()
    init_distributed(cfg, LaunchEnv(0, 1, 0, "127.0.0.1", 0, "single") if own_group else None)
    try:
        chunks = build_model(cfg)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                state = dist_checkpointing.load(_model_sharded(chunks), str(ckpt))
        except (Exception, CheckpointException) as e:
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot load the model of checkpoint {ckpt}: {last}") from e
        for i, m in enumerate(chunks):
            m.load_state_dict(state[f"model{i}"], strict=True)
        params = full_tensors(chunks, "param")
    finally:
        if own_group:
            destroy_distributed()
    vocab_file = ckpt / "vocab.json"
    vocab = json.loads(vocab_file.read_text()) if vocab_file.is_file() else None
    return CheckpointModel(path=ckpt, cfg=cfg, params=params, vocab=vocab, meta=meta)


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


def _check_model_shape(path: Path, cfg) -> None:
    """Name the ``model.*`` keys whose values differ from the checkpoint's (they change shapes)."""
    saved = yaml.safe_load((path / "config.yaml").read_text()).get("model", {})
    ours = cfg.to_dict()["model"]
    diffs = [
        f"model.{k}={saved.get(k)!r} there, {ours[k]!r} here"
        for k in SHAPE_KEYS
        if k in saved and saved[k] != ours[k]
    ]
    if diffs:
        raise CheckpointError(f"checkpoint {path} has another model shape: " + "; ".join(diffs))


def _restore_rng_and_data(trainer: Trainer, path: Path, meta: dict, same_layout: bool) -> None:
    """Same layout: this rank's RNG and data state. Same DP size: its DP rank's data state.

    RNG streams are per rank and do not carry over to another layout (training noise is keyed
    by (seed, step, DP rank, micro-batch), so this does not change the losses). A data
    position saved at another DP size cannot be mapped: the loader then starts afresh, and
    every rank says so.
    """
    rank_file = path / f"rank_{trainer.ranks.rank:05d}.pt"
    if same_layout and rank_file.is_file():
        own = torch.load(rank_file, weights_only=False)
        set_rng_state(own["rng"])
        trainer.source.load_state_dict(own["source"])
        return
    by_dp = torch.load(path / "data_state.pt", weights_only=False)
    saved_dp = meta["layout"]["dp"]
    if saved_dp == trainer.ranks.dp:
        trainer.source.load_state_dict(by_dp[trainer.ranks.dp_rank])
    elif any(by_dp.values()):
        print(
            f"megadiff: rank {trainer.ranks.rank}: data position NOT restored: {path} was "
            f"saved with DP={saved_dp}, this run has DP={trainer.ranks.dp} (the loader state "
            "is per DP rank); the data loader starts from its beginning",
            flush=True,
        )


# ----------------------------------------------------------------------------- helpers


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
