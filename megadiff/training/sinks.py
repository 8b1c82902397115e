"""Where the metrics records go besides ``metrics.jsonl``: TensorBoard and Weights & Biases.

Every sink is fed the same record stream as ``metrics.jsonl`` (training and eval records, by
:class:`megadiff.training.metrics.MetricsLogger` on the logging rank) and turns each record's
numbers into scalars with :func:`scalar_tags`. A sink never waits on a network: TensorBoard
writes local files from a background thread; W&B ``offline`` writes local files and ``online``
uploads from wandb's own background process.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any, Protocol

from megadiff.config import Config, ConfigError

# record keys that are x-axes, not curves
NOT_SCALARS = ("step", "tokens")
TOKENS_AXIS = "by_tokens/"  # TensorBoard: the same scalars again with tokens as the step


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None:
        """Take one metrics record (it has ``step``; ``tokens`` when known)."""

    def close(self) -> None:
        """Flush and release (idempotent)."""


def scalar_tags(record: dict[str, Any]) -> dict[str, float]:
    """A record's finite numbers by scalar name: ``loss``/``loss_<modality>`` ->
    ``train/loss``/``train/loss_<modality>``, any ``val_<x>`` -> ``val/<x>`` (``val/loss``,
    ``val/loss_<modality>``, ``val/ppl``, ...), every other number under its own key (``lr``,
    ``grad_norm``, ``tokens_per_s``, ``peak_memory_gib``, ...). Booleans, None and non-finite
    values are left out (``metrics.jsonl`` keeps them)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        if key == "loss" or key.startswith("loss_"):
            tag = f"train/{key}"
        elif key.startswith("val_"):
            tag = f"val/{key[4:]}"
        else:
            tag = key
        out[tag] = float(value)
    return out


class TensorBoardSink:
    """Scalars under ``<run.dir>/tensorboard/``: each tag at x = step, and again as
    ``by_tokens/<tag>`` at x = tokens (compare runs of different batch sizes there)."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer: Any = SummaryWriter(log_dir=str(log_dir), flush_secs=30)

    def write(self, record: dict[str, Any]) -> None:
        step, tokens = int(record["step"]), record.get("tokens")
        for tag, value in scalar_tags(record).items():
            self.writer.add_scalar(tag, value, step)
            if isinstance(tokens, int):
                self.writer.add_scalar(TOKENS_AXIS + tag, value, tokens)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbSink:
    """One W&B run per training run, in ``<run.dir>/wandb/``, with the resolved config; each
    record is logged at its ``step`` with ``tokens`` beside it (pick it as the x axis in the
    W&B UI). A run resumed from its own checkpoint continues the same W&B run (its id is kept
    in ``<run.dir>/wandb/megadiff-run-id``); a fresh start begins a new one."""

    def __init__(self, cfg: Config, resumed: bool = False) -> None:
        import wandb

        w, run_dir = cfg.logging.wandb, Path(cfg.run.dir)
        self.run: Any = wandb.init(
            project=w.project,
            entity=w.entity,
            mode=w.mode,
            dir=str(run_dir),
            name=cfg.run.name or run_dir.name,
            config=cfg.to_dict(),
            id=wandb_run_id(run_dir, resumed),
            resume="allow",
            # no stdout/stderr capture: the progress line and the logs stay as they are
            settings=wandb.Settings(console="off"),
        )

    def write(self, record: dict[str, Any]) -> None:
        data: dict[str, Any] = dict(scalar_tags(record))
        if "tokens" in record:
            data["tokens"] = record["tokens"]
        self.run.log(data, step=int(record["step"]))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


WANDB_ID_FILE = Path("wandb") / "megadiff-run-id"


def wandb_run_id(run_dir: Path, resumed: bool) -> str:
    """The W&B run id of ``run_dir``: the kept one when ``resumed``, else a new one (kept)."""
    path = run_dir / WANDB_ID_FILE
    if resumed and path.is_file() and (kept := path.read_text().strip()):
        return kept
    new = uuid.uuid4().hex[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(new + "\n")
    os.replace(tmp, path)
    return new


def wandb_enabled(cfg: Config) -> bool:
    w = cfg.logging.wandb
    return w.project is not None and w.mode != "disabled"


def check_logging(cfg: Config) -> None:
    """Before any set-up: the packages the configured sinks need are importable
    (:class:`ConfigError` naming the key and the install command otherwise)."""
    import importlib.util

    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "config key 'logging.tensorboard': the tensorboard package is not installed; "
            "run `pip install tensorboard` or set logging.tensorboard=false"
        )
    if wandb_enabled(cfg) and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"config key 'logging.wandb.mode': '{cfg.logging.wandb.mode}' needs the wandb "
            "package; run `pip install 'megadiff[wandb]'` (or `bash tools/install.sh --wandb`), "
            "or set logging.wandb.mode=disabled"
        )


def build_sinks(cfg: Config, resumed: bool = False) -> list[Sink]:
    """The sinks ``cfg.logging`` asks for (call on the logging rank only); ``resumed``: the
    run continues from its own checkpoint."""
    sinks: list[Sink] = []
    if cfg.logging.tensorboard:
        sinks.append(TensorBoardSink(Path(cfg.run.dir) / "tensorboard"))
    if wandb_enabled(cfg):
        sinks.append(WandbSink(cfg, resumed))
    return sinks
