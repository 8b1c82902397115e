"""The metrics contract: ``<run.dir>/metrics.jsonl`` (one strict-JSON object per optimizer
step, with ``loss``; one per held-out evaluation, with ``val_loss``; a non-finite number is
written as null), the same records to TensorBoard / W&B (:mod:`megadiff.training.sinks`), a
one-line terminal progress display and the end-of-run summary. Only the logging rank writes."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from megadiff.training.sinks import Sink


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN/infinite float (in nested dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def json_line(record: dict[str, Any]) -> str:
    """One strict-JSON line (non-finite numbers written as null), readable by any JSON parser."""
    return json.dumps(finite_or_null(record), allow_nan=False) + "\n"


SUPERSEDED = "metrics.superseded.jsonl"


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keep the records up to ``step`` in ``path`` so a resumed run appends cleanly; later ones
    (steps the run is about to redo, or a whole earlier run's when it starts at 0) are appended
    to ``metrics.superseded.jsonl`` beside it, never dropped. A torn last line is dropped.
    Returns how many records moved."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept, moved = [], []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        past = isinstance(record, dict) and record.get("step", 0) > step
        (moved if past else kept).append(line)
    if len(kept) == len(lines):
        return 0
    if moved:
        with open(path.with_name(SUPERSEDED), "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in moved))
            f.flush()
            os.fsync(f.fileno())
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
    return len(moved)


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        enabled: bool,
        every: int = 1,
        progress: bool = True,
        stream: TextIO | None = None,
        sinks: list[Sink] | None = None,
    ) -> None:
        self.enabled = enabled
        self.sinks = list(sinks or []) if enabled else []
        self.last_train: dict[str, Any] | None = None  # the last training record written
        self.last_val: dict[str, Any] | None = None  # the last record with a val_loss
        self.total = total_steps
        self.every = every
        self.stream = stream or sys.stdout
        self.live = progress and self.stream.isatty()
        self.progress = progress
        self.start = time.perf_counter()
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record to ``metrics.jsonl`` and pass it to the sinks (no progress line)."""
        if not self.enabled:
            return
        self._file.write(json_line(record))
        self._file.flush()
        for sink in self.sinks:
            sink.write(record)
        if "loss" in record:
            self.last_train = record
        if "val_loss" in record:
            self.last_val = record

    def log(self, record: dict[str, Any]) -> None:
        """Append a training step's record and show the progress line when it is due (an eval
        record, with ``val_loss``: its one-line summary, always)."""
        if not self.enabled:
            return
        self.write(record)
        if "val_loss" in record:
            self.info(eval_line(record))
            return
        step = record["step"]
        if self.progress and (step % self.every == 0 or step == self.total):
            self._print(record)

    def _print(self, r: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - self.start
        done = r["step"] / max(self.total, 1)
        eta = elapsed / done * (1 - done) if done > 0 else 0.0
        parts = [f"step {r['step']}/{self.total}", f"loss {r['loss']:.4f}"]
        parts += [f"{k[5:]} {v:.3f}" for k, v in r.items() if k.startswith("loss_")]
        parts.append(f"lr {r['lr']:.2e}")
        if r.get("grad_norm") is not None:
            parts.append(f"gnorm {r['grad_norm']:.3f}")
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
        if r.get("peak_memory_gib") is not None:
            parts.append(f"mem {r['peak_memory_gib']:.2f} GiB")
        parts.append(f"eta {_fmt_time(eta)}")
        if r.get("data_skipped"):
            parts.append(f"{r['data_skipped']} bad samples skipped")
        line = " | ".join(parts)
        if self.live:
            end = "\n" if r["step"] == self.total else ""
            self.stream.write("\r\033[K" + line + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def info(self, msg: str) -> None:
        if self.enabled:
            if self.live:
                self.stream.write("\r\033[K")
            self.stream.write(msg + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for sink in self.sinks:
            sink.close()


def eval_line(r: dict[str, Any]) -> str:
    """``eval step 200: val_loss 3.2100 (text 3.500 image 2.900 audio 3.100) ppl 24.8``."""
    mods = " ".join(
        f"{k[9:]} {v:.3f}" for k, v in r.items() if k.startswith("val_loss_") and v is not None
    )
    ppl = r.get("val_ppl")
    return (
        f"eval step {r['step']}: val_loss {r['val_loss']:.4f}"
        + (f" ({mods})" if mods else "")
        + (f" ppl {ppl:.4g}" if ppl is not None else "")
    )


def open_run(cfg: Any, is_logger: bool, step: int = 0, resumed: bool = False) -> MetricsLogger:
    """Prepare ``run.dir`` (resolved ``config.yaml``; metrics past ``step`` moved aside: see
    :func:`truncate_metrics`) on the logging rank and return the run's metrics logger (a no-op
    elsewhere); ``resumed``: from the run's own checkpoint (W&B continues its run)."""
    from megadiff.config import dump_config
    from megadiff.training.sinks import build_sinks

    run_dir = Path(cfg.run.dir)
    if is_logger:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        if moved := truncate_metrics(run_dir / "metrics.jsonl", step):
            print(
                f"megadiff: moved {moved} metrics record(s) past step {step} from "
                f"{run_dir / 'metrics.jsonl'} to {run_dir / SUPERSEDED}",
                flush=True,
            )
    return MetricsLogger(
        run_dir,
        cfg.train.steps,
        enabled=is_logger,
        every=cfg.logging.every,
        progress=cfg.logging.progress,
        # none for a run with nothing left to train (it says so and ends)
        sinks=build_sinks(cfg, resumed) if is_logger and step < cfg.train.steps else None,
    )


def step_record(
    step: int,
    stats: Any,
    tokens: int,
    lr: float,
    grad_norm: Any,
    step_tokens: int,
    seconds: float,
    skipped: bool,
) -> dict[str, Any]:
    """One ``metrics.jsonl`` record (the metrics contract); ``stats`` is the step's summed
    loss-statistics tensor (None on ranks without the loss)."""
    from megadiff.diffusion.objective import summarize

    record: dict[str, Any] = {"step": step}
    if stats is not None:
        record.update(summarize(stats.cpu()))
    record.update(
        tokens=tokens,
        lr=lr,
        grad_norm=float(grad_norm) if grad_norm is not None else None,
        tokens_per_s=step_tokens / seconds,
        step_time=seconds,
        peak_memory_gib=peak_memory_gib(),
        skipped=skipped,
    )
    return record


def peak_memory_gib() -> float | None:
    """This process's peak memory in GiB: the most CUDA memory allocated by torch on a GPU, the
    peak resident set size (RSS) on CPU; None where neither can be read."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource
    except ImportError:  # not POSIX: the current RSS instead
        try:
            import psutil
        except ImportError:
            return None
        return psutil.Process().memory_info().rss / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB (bytes on macOS)
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def run_summary(
    start_step: int,
    step: int,
    tokens: int,
    seconds: float,
    reason: str,
    exit_code: int,
    checkpoint: Path | None,
    last_train: dict[str, Any] | None,
    last_val: dict[str, Any] | None,
) -> list[str]:
    """The end-of-run summary lines (steps, tokens, wall time, final losses, checkpoint, why)."""

    def loss(record: dict[str, Any] | None, key: str) -> str:
        if record is None or record.get(key) is None:
            return "none"
        return f"{record[key]:.4f} (step {record['step']})"

    rows = [
        ("steps", f"{step:,} ({step - start_step:,} this run, from step {start_step:,})"),
        ("tokens", f"{tokens:,}"),
        ("wall time", _fmt_time(seconds)),
        ("train loss", loss(last_train, "loss")),
        ("val loss", loss(last_val, "val_loss")),
        ("checkpoint", str(checkpoint) if checkpoint is not None else "none saved"),
    ]
    return [f"megadiff: run ended: {reason} (exit {exit_code})"] + [
        f"  {name:<11} {value}" for name, value in rows
    ]
