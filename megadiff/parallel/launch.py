"""Run a function in N local processes as a torch.distributed world (gloo on CPU).

Used by the tests and tools: a forkserver with torch and megatron-core preloaded makes each
extra world cost well under a second instead of a fresh interpreter start-up per rank.
"""

from __future__ import annotations

import os
import queue as queue_mod
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from megadiff.parallel.state import PORT_TAKEN

PRELOAD = ["megadiff", "torch", "megatron.core", "megadiff.training.trainer"]
_ctx = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def _entry(fn, rank, world, port, env, args, queue, out_dir) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        # results go through a file: tensors in a queue would outlive their sender
        torch.save(fn(*args), os.path.join(out_dir, f"{rank}.pt"))
        queue.put((rank, "ok", None))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1) from None


def run_world(
    fn: Callable[..., Any],
    world: int,
    args: tuple = (),
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
    attempts: int = 3,
) -> list[Any]:
    """Call ``fn(*args)`` on ``world`` ranks; return each rank's result (rank order).

    ``fn`` must be importable (module-level). Raises ``RuntimeError`` with the failing
    rank's traceback if any rank fails. The rendezvous port is picked free, and another
    process can take it before rank 0 listens on it: then the world is started again on a new
    port (up to ``attempts`` times).
    """
    for _ in range(attempts):
        results, errors = _run_once(fn, world, args, env or {}, timeout, free_port())
        if not errors:
            return [results[r] for r in range(world)]
        if not any(PORT_TAKEN in e for e in errors):
            break
    raise RuntimeError("\n".join(errors))


def _run_once(
    fn: Callable[..., Any], world: int, args: tuple, env: dict, timeout: float, port: int
) -> tuple[dict[int, Any], list[str]]:
    """One start of the world on ``port``: (results by rank, errors)."""
    ctx = _context()
    queue = ctx.Queue()
    out_dir = tempfile.mkdtemp(prefix="megadiff-world-")
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, port, env, args, queue, out_dir))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while len(results) < world and not errors:
        try:
            rank, status, payload = queue.get(timeout=1.0)
        except queue_mod.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                errors.append(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
            elif time.monotonic() > deadline:
                errors.append(f"world of {world} timed out after {timeout:.0f}s")
            continue
        if status == "ok":
            results[rank] = torch.load(os.path.join(out_dir, f"{rank}.pt"), weights_only=False)
        else:
            errors.append(f"rank {rank} failed:\n{payload}")
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
            p.join()
    shutil.rmtree(out_dir, ignore_errors=True)
    return results, errors
