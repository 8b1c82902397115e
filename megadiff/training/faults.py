"""Preemption and fault handling: stop signals, a wall-clock budget, non-finite steps.

Exit codes of ``megadiff train`` (the Slurm scripts requeue on ``EXIT_REQUEUE``):

* 0  training finished (``train.steps`` reached)
* 2  bad configuration, unusable ``checkpoint.load``, ``run.dir`` in use by another run, or a
  checkpoint directory that is not writable or too full (nothing was trained); or a save that
  ran out of space (the previous checkpoint is intact); or data that cannot be read mid-run
  (every rank stops before that step; the last completed step is saved)
* 3  ``train.nonfinite=stop``: a step had a non-finite loss or gradient; or
  ``train.nonfinite=skip``: ``train.max_nonfinite_streak`` steps in a row were; a checkpoint
  (of the last good weights) was saved
* 75 (``EX_TEMPFAIL``) stopped early by SIGTERM/SIGUSR1 or ``train.exit_after_minutes`` after
  saving a checkpoint: run the same command again to continue
* 130 stopped by SIGINT (Ctrl-C) after saving a checkpoint; a second Ctrl-C interrupts at once
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_REQUEUE = 75
EXIT_INTERRUPTED = 130
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold back SIGTERM/SIGUSR1/SIGINT in the calling thread while the body runs.

    Processes started inside inherit the blocked mask and keep it: megatron-core's checkpoint
    writers (a ``multiprocessing`` manager started at the first save, forked writers at every
    save) then never receive the stop signals that Slurm, ``scancel`` or torchrun send to the
    whole job step or process group, and the save they serve completes. In this process a
    signal that arrives meanwhile is delivered when the body ends (or at once to another
    thread): nothing is lost.
    """
    from multiprocessing import resource_tracker

    held = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        # multiprocessing's resource tracker (which the writers' manager needs) ignores
        # SIGINT/SIGTERM itself and inherits SIGUSR1 blocked from here; starting it unblocks
        # SIGINT/SIGTERM in this thread again, so block them once more after it
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class StopRequest:
    """Catches SIGTERM/SIGUSR1/SIGINT and tracks the time budget; ranks agree with one
    all-reduce.

    Handlers only set a flag: the loop saves at the end of the current step. A second
    SIGTERM/SIGUSR1 while stopping is ignored (Slurm may repeat it); a second SIGINT raises
    ``KeyboardInterrupt`` at once.
    """

    def __init__(self, budget_minutes: float | None = None) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_minutes * 60 if budget_minutes else None
        self.signal: int | None = None
        self.reason: str | None = None
        self.exit_code = EXIT_REQUEUE
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def start_budget(self, budget_minutes: float | None) -> None:
        """The wall-clock budget, counted from now."""
        self.start = time.monotonic()
        self.budget_s = budget_minutes * 60 if budget_minutes else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            if self.signal == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second one: at once
        if self.signal is None or signum == signal.SIGINT:
            self.signal = signum

    def local_code(self, budget: bool = True) -> int:
        """0 = keep going, 1 = time budget spent, 2 = a stop signal arrived, 3 = SIGINT (this
        rank); ``budget=False`` ignores the time budget."""
        if self.signal is not None:
            return 3 if self.signal == signal.SIGINT else 2
        if budget and self.budget_s is not None and time.monotonic() - self.start >= self.budget_s:
            return 1
        return 0

    def should_stop(self, budget: bool = True) -> bool:
        """Collective: True on every rank when any rank got a signal or (with ``budget``) ran
        out of time; sets :attr:`reason` and :attr:`exit_code` (75, or 130 for SIGINT)."""
        import torch
        import torch.distributed as dist

        from megadiff.parallel.state import device

        code = torch.tensor([self.local_code(budget)], dtype=torch.int32, device=device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
        c = int(code.item())
        if c >= 2:
            name = signal.Signals(self.signal).name if self.signal else "a stop signal"
            self.reason = f"received {name}" if self.signal else "another rank received a signal"
            self.exit_code = EXIT_INTERRUPTED if c == 3 else EXIT_REQUEUE
        elif c == 1:
            self.reason = f"time budget of {self.budget_s / 60:g} minute(s) spent"
        return c > 0


_EARLY: StopRequest | None = None


def catch_stop_signals_early() -> StopRequest:
    """Install the stop-signal handlers at the start of a command, so a signal during imports,
    model build or checkpoint load is honoured too (the training loop takes this request over:
    :func:`take_stop_request`)."""
    global _EARLY
    if _EARLY is None:
        _EARLY = StopRequest().install()
    return _EARLY


def release_stop_signals() -> None:
    """Uninstall the early handlers when the command ended before its training loop took them
    (e.g. a config error): a library caller's process keeps its own signal handling."""
    global _EARLY
    if _EARLY is not None:
        _EARLY.uninstall()
        _EARLY = None


def take_stop_request() -> StopRequest:
    """The request installed early by this process's command, or a newly installed one."""
    global _EARLY
    request, _EARLY = _EARLY, None
    return request if request is not None and request.installed else StopRequest().install()


def nonfinite_anywhere(loss: torch.Tensor | None, grad_buffers: list[torch.Tensor]) -> bool:
    """Collective: True on every rank when any rank's loss or local gradients are non-finite."""
    import torch
    import torch.distributed as dist

    from megadiff.parallel.state import device

    bad = loss is not None and not bool(torch.isfinite(loss).all())
    if not bad:
        bad = any(not bool(torch.isfinite(g).all()) for g in grad_buffers)
    flag = torch.tensor([int(bad)], dtype=torch.int32, device=device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
