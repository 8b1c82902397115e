"""Checkpoint directories on disk: naming, manifest and checksums, verification, discovery of
the newest valid checkpoint, atomic publication and pruning.

A checkpoint is a directory ``<checkpoint.dir>/step_<00000042>/`` whose ``manifest.json``
(written last) lists every other file with its size and SHA-256. It is written to
``.tmp_step_<n>/`` and renamed when complete, so a crash leaves either a complete checkpoint or
a ``.tmp_`` directory that is never loaded (and removed by the next save). What goes inside is
written by :mod:`megadiff.training.checkpoint` and read by it and by
:mod:`megadiff.model.reader`; this module only handles the files.

A checkpoint of this run found unusable at resume is renamed ``corrupt-step_<n>-<unix time>``:
never loaded, never counted or removed by pruning (delete it by hand).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

MANIFEST = "manifest.json"
FORMAT = "megadiff-checkpoint-1"
_NAME = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path or file."""


def checkpoint_root(cfg) -> Path:
    return Path(cfg.checkpoint.dir or os.path.join(cfg.run.dir, "checkpoints"))


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def log_rank0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"megadiff: {msg}", flush=True)


# ----------------------------------------------------------------------------- collectives


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a no-op without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    me, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {f: _sha256(ckpt / f) for f in files[me::world] if (ckpt / f).is_file()}
    if world == 1:
        return mine
    parts: list[dict[str, str] | None] = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for p in parts for k, v in (p or {}).items()}


def write_manifest(ckpt: Path, step: int) -> None:
    """Collective: hash every file of ``ckpt``; rank 0 writes ``manifest.json`` last."""
    files = broadcast(_payload_files(ckpt) if rank() == 0 else [])
    digests = _hash_distributed(ckpt, files)
    if rank() == 0:
        entries = {f: {"size": (ckpt / f).stat().st_size, "sha256": digests[f]} for f in files}
        manifest = {"format": FORMAT, "step": step, "time": time.time(), "files": entries}
        tmp = ckpt / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        fsync(tmp)
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
        problem, files = broadcast((problem, files))
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
    except OSError as e:
        return f"{mpath} cannot be read ({e.strerror})"
    except Exception:  # noqa: BLE001 - any parse problem makes the manifest unusable
        return f"{mpath} is not a valid {FORMAT} manifest"
    for f, e in sorted(entries.items()):
        p = ckpt / f
        if not p.is_file():
            return f"file {p} is missing"
        size = p.stat().st_size
        if size != e["size"]:
            return f"file {p} has {size} bytes, {MANIFEST} says {e['size']} (truncated or corrupt)"
        if (why := _unreadable(p)) is not None:
            return f"file {p} cannot be read ({why})"
    return None


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be opened for reading (e.g. its permissions), or None."""
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        return e.strerror or str(e)


# ----------------------------------------------------------------------------- discovery


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Completed (renamed) checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def find_latest_valid(
    root: Path, checksums: bool = True, set_aside_bad: bool = False
) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; bad ones are reported and skipped.

    ``set_aside_bad`` (this run's own checkpoints only): collective; rank 0 also renames each bad
    one with :func:`set_aside`, so neither a later resume nor pruning counts it.
    """
    found = None
    for _, path in reversed(broadcast(list_checkpoints(root))):
        problem = verify(path, checksums)
        if problem is None:
            found = path
            break
        log_rank0(f"checkpoint {path.name} is unusable, skipping it: {problem}")
        if set_aside_bad and rank() == 0:
            set_aside(path)
    if set_aside_bad:
        barrier()
    return found


def set_aside(path: Path) -> Path:
    """Rename the unusable checkpoint ``path`` to ``corrupt-<name>-<unix time>`` beside it (never
    loaded, pruned or deleted by megadiff) and warn, naming both."""
    stamp = int(time.time())
    aside = path.parent / f"corrupt-{path.name}-{stamp}"
    while aside.exists():
        stamp += 1
        aside = path.parent / f"corrupt-{path.name}-{stamp}"
    path.rename(aside)
    print(
        f"megadiff: WARNING: moved the unusable checkpoint {path} to {aside}; it is never "
        "loaded or pruned: inspect it, then delete it by hand",
        flush=True,
    )
    return aside


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


def resolve_any(path: str | os.PathLike, checksums: bool = True) -> Path:
    """A checkpoint, a directory of checkpoints or a run directory -> the checkpoint to read."""
    p = Path(path)
    if p.exists() and not (p / MANIFEST).exists() and (p / "checkpoints").is_dir():
        p = p / "checkpoints"  # a run directory
    if p.exists() and not (p / MANIFEST).exists() and not list_checkpoints(p):
        raise CheckpointError(
            f"{path} is not a megadiff checkpoint (no {MANIFEST}, no step_* checkpoints in it)"
        )
    return resolve_load_path(p, checksums)


def resume_source(cfg) -> tuple[Path, bool] | None:
    """Collective: what to start from, ``(path, own_run)``, or None for a fresh start.

    The newest valid checkpoint of this run wins (a restart); otherwise ``checkpoint.load``.
    """
    c = cfg.checkpoint
    if c.resume:
        latest = find_latest_valid(checkpoint_root(cfg), c.checksums, set_aside_bad=True)
        if latest is not None:
            return latest, True
    if c.load:
        return resolve_load_path(c.load, c.checksums), False
    return None


def preflight(cfg) -> None:
    """Cheap checks before any set-up (no process group, no model): ``checkpoint.load`` (sizes
    only; skipped when this run already has checkpoints, which a restart resumes from instead),
    then that the checkpoint directory is writable and has room for one more checkpoint."""
    c = cfg.checkpoint
    if c.load and not (c.resume and list_checkpoints(checkpoint_root(cfg))):
        check_load_leaves_steps(cfg, resolve_load_path(c.load, checksums=False))
    root = checkpoint_root(cfg)
    check_writable(root)
    check_free_space(root, estimated_checkpoint_bytes(cfg))


def check_load_leaves_steps(cfg, path: Path) -> None:
    """``checkpoint.load`` keeps the source's step unless ``checkpoint.reset_step``: a source at
    or beyond ``train.steps`` would train nothing, so that is refused (:class:`CheckpointError`)."""
    if cfg.checkpoint.reset_step:
        return
    step = int(json.loads((path / MANIFEST).read_text())["step"])
    if step >= cfg.train.steps:
        raise CheckpointError(
            f"checkpoint.load={cfg.checkpoint.load}: {path} is at step {step}, at or beyond "
            f"train.steps={cfg.train.steps}, so there is nothing to train; raise train.steps "
            f"above {step} to continue it, or set checkpoint.reset_step=true to start a new run "
            "at step 0 from its weights"
        )


# fp32 weights, an fp32 main copy and two fp32 Adam moments per parameter, plus headroom
BYTES_PER_PARAMETER = 20
DEEPSPEED_EXTRA_BYTES = 4  # DeepSpeed keeps its own copy of the module's weights
FIXED_BYTES = 1 << 20  # metadata, config, tokenizers
BYTES_PER_RANK = 64 << 10  # rank_<r>.pt: RNG and data-source state


def estimated_checkpoint_bytes(cfg) -> int:
    """A generous estimate of one checkpoint's size, from the resolved config."""
    per_param = BYTES_PER_PARAMETER
    if cfg.train.engine == "deepspeed":
        per_param += DEEPSPEED_EXTRA_BYTES
    p = cfg.parallel
    world = p.tensor_parallel * p.pipeline_parallel * (p.data_parallel or 1)
    return cfg.model.parameter_count() * per_param + FIXED_BYTES + world * BYTES_PER_RANK


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_writable(root: Path, what: str = "checkpoint directory") -> None:
    """Create ``root`` if needed and write, then remove, a probe file in it; a
    :class:`CheckpointError` names the directory (``what``: which one) when that fails."""
    probe = root / f".write_probe_{socket.gethostname()}_{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"megadiff")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"{what} {root} is not writable ({e.strerror}: {e.filename}); fix its "
            "permissions or mount, or point checkpoint.dir (or run.dir) elsewhere"
        ) from e


def check_free_space(root: Path, need: int) -> None:
    """A :class:`CheckpointError` naming ``root`` when it has less than ``need`` bytes free."""
    have = shutil.disk_usage(root).free
    if have < need:
        raise CheckpointError(
            f"not enough space for a checkpoint in {root}: need ~{human_bytes(need)} (estimated "
            f"from the parameter count), have {human_bytes(have)}; free space there or point "
            "checkpoint.dir elsewhere"
        )


def is_disk_full(error: BaseException, root: Path, need: int) -> bool:
    """Whether a failed write under ``root`` ran out of space: ``error`` (or one it was raised
    from) is ENOSPC or says so, or ``root`` now has less than ``need`` bytes free (writers that
    re-raise a short write as another error, e.g. torch's "unexpected pos")."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    try:
        return shutil.disk_usage(root).free < need
    except OSError:
        return False


# ----------------------------------------------------------------------------- writing


def start_tmp(root: Path, step: int) -> tuple[Path, Path]:
    """Collective: an empty ``.tmp_step_<n>`` under ``root``; returns ``(tmp, final)``."""
    name = checkpoint_name(step)
    final, tmp = root / name, root / f".tmp_{name}"
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    return tmp, final


def publish(tmp: Path, final: Path, step: int, keep: int) -> None:
    """Collective: manifest, then rename ``tmp`` to ``final`` (a checkpoint already there, of the
    same step, was skipped as unusable: it is set aside), then prune to the newest ``keep``."""
    barrier()
    write_manifest(tmp, step)
    if rank() == 0:
        root = final.parent
        if final.exists():
            set_aside(final)
        tmp.rename(final)
        fsync(root)
        prune(root, keep, final)
    barrier()


def prune(root: Path, keep: int, published: Path | None = None) -> None:
    """Remove stale temporary directories and all but the newest ``keep`` checkpoints.

    With ``published`` (the checkpoint just written, the newest valid one) only checkpoints of
    earlier steps are counted and removed: ``published`` and the ``keep - 1`` newest before it
    stay, and checkpoints of later steps (not of this run's history) are left alone.
    """
    for p in root.glob(".tmp_step_*"):
        shutil.rmtree(p, ignore_errors=True)
    ckpts = list_checkpoints(root)
    if published is not None:
        last = next(s for s, p in ckpts if p == published)
        ckpts = [(s, p) for s, p in ckpts if s <= last]
    for _, path in ckpts[: max(len(ckpts) - keep, 0)]:
        shutil.rmtree(path, ignore_errors=True)
