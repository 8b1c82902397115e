"""``megadiff demo [key=value ...]``: train the tiny model on built-in data, end to end.

Takes the same dotted overrides as ``megadiff train`` and runs the same way (one process,
torchrun or srun). Writes ``<run.dir>/metrics.jsonl`` with one loss per modality.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megadiff.config import ConfigError, load_config, validate
from megadiff.parallel.env import read_launch_env

# the tiny CPU model (same as examples/tiny_cpu.yaml)
DEMO = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=192",
    "model.vocab_size=512",
    "model.seq_length=64",
    "optim.lr=2e-3",
    "optim.warmup_tokens=5120",
    "optim.weight_decay=0.0",
    "train.steps=300",
    "train.micro_batch=16",
    "train.global_batch=32",
    "logging.every=20",
    "run.dir=runs/demo",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")


def _summary(run_dir: Path) -> str:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    k = max(1, len(rows) // 10)
    first, last = rows[:k], rows[-k:]

    def mean(rs, key):
        vals = [r[key] for r in rs if key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    keys = ["loss"] + sorted(key for key in rows[-1] if key.startswith("loss_"))
    parts = [f"{key}: {mean(first, key):.3f} -> {mean(last, key):.3f}" for key in keys]
    return f"demo finished: {len(rows)} steps; " + ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    launch = read_launch_env()
    try:
        cfg = validate(load_config(None, [*DEMO, *args.overrides]), launch.world_size)
    except ConfigError as e:
        print(f"megadiff demo: error: {e}", file=sys.stderr)
        return 2
    from megadiff.parallel.state import destroy_distributed
    from megadiff.training.trainer import Trainer

    try:
        trainer = Trainer(cfg)
        trainer.fit()
        is_logger = trainer.ranks.is_logger
    finally:
        destroy_distributed()
    if is_logger:
        print(_summary(Path(cfg.run.dir)))
        print(f"metrics: {Path(cfg.run.dir) / 'metrics.jsonl'}")
    return 0
