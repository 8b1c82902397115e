"""The metrics contract: ``<run.dir>/metrics.jsonl`` (one strict-JSON object per optimizer
step, with ``loss``; one per held-out evaluation, with ``val_loss``; a non-finite number is
written as null) and a one-line terminal progress display. Only the logging rank writes."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO


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
    ) -> None:
        self.enabled = enabled
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
        """Append one record to ``metrics.jsonl`` (no progress line)."""
        if self.enabled:
            self._file.write(json_line(record))
            self._file.flush()

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
        parts += [f"lr {r['lr']:.2e}", f"{r['tokens_per_s']:,.0f} tok/s", f"eta {_fmt_time(eta)}"]
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


def open_run(cfg: Any, is_logger: bool, step: int = 0) -> MetricsLogger:
    """Prepare ``run.dir`` (resolved ``config.yaml``; metrics past ``step`` moved aside: see
    :func:`truncate_metrics`) on the logging rank and return the run's metrics logger (a no-op
    elsewhere)."""
    from megadiff.config import dump_config

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
        skipped=skipped,
    )
    return record
