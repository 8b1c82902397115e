"""One run per directory: ``megadiff train`` (and ``megadiff demo``) locks its ``run.dir``
(and ``checkpoint.dir`` when that lies elsewhere) before any process group or model exists.

Rank 0 holds an exclusive ``flock`` on ``<dir>/.megadiff.lock`` for the whole run and writes its
PID and host into the file. The kernel (or the file system's lock manager) drops the lock when
the process dies, however it dies, so a crashed run never blocks the next one. A second run on
the same directory is refused with the holder's PID and host; with several ranks, rank 0 tells
the others through the launch's rendezvous store, so every rank exits with the same message.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megadiff.checkpoint_files import CheckpointError, check_writable, checkpoint_root
from megadiff.parallel.env import LaunchEnv

LOCK_NAME = ".megadiff.lock"
VERDICT_KEY = "megadiff/run_dir_lock"


class RunDirLocked(RuntimeError):
    """Another live run holds this run's directory; the message names it and the holder."""


def _lock_one(directory: Path, what: str) -> int | None:
    """Take ``directory``'s lock (``what``: which directory, for messages); returns the open
    file descriptor that holds it (None where the file system has no locks: a warning says
    so)."""
    check_writable(directory, what)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        key = "checkpoint.dir" if what.startswith("checkpoint") else "run.dir"
        raise RunDirLocked(
            f"{directory} is in use by another megadiff run ({holder}; lock file {path}); wait "
            f"for it to finish or stop it, or give this run another {key}"
        ) from None
    except OSError as e:
        os.close(fd)
        print(
            f"megadiff: WARNING: cannot lock {path} ({e.strerror}): not guarding against a "
            "second run on the same directory",
            flush=True,
        )
        return None
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {stamp}\n".encode(), 0)
    return fd


def run_dirs(cfg) -> list[tuple[Path, str]]:
    """``run.dir``, and ``checkpoint.dir`` when it is not inside it (with what each is)."""
    run_dir = Path(cfg.run.dir).resolve()
    ckpt = checkpoint_root(cfg).resolve()
    dirs = [(run_dir, "run directory")]
    return dirs if ckpt.is_relative_to(run_dir) else [*dirs, (ckpt, "checkpoint directory")]


def _lock_all(dirs: list[tuple[Path, str]]) -> list[int]:
    fds: list[int] = []
    try:
        for d, what in dirs:
            if (fd := _lock_one(d, what)) is not None:
                fds.append(fd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


@contextmanager
def hold_run_dirs(cfg, launch: LaunchEnv) -> Iterator[None]:
    """Hold the run's directories while the body runs (rank 0 locks; with several ranks it
    shares the outcome through the launch store). Raises :class:`RunDirLocked` on every rank
    when another live run holds one of them, or one cannot be created or written."""
    fds: list[int] = []
    refusal = ""
    if launch.rank == 0:
        try:
            fds = _lock_all(run_dirs(cfg))
        except (RunDirLocked, CheckpointError) as e:
            refusal = str(e)
    if launch.world_size > 1:
        from megadiff.parallel.state import launch_store

        store = launch_store(launch)
        if launch.rank == 0:
            store.set(VERDICT_KEY, refusal)
        else:
            refusal = store.get(VERDICT_KEY).decode()
    if refusal:
        raise RunDirLocked(refusal)
    try:
        yield
    finally:
        for fd in fds:
            os.close(fd)
