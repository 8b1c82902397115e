"""Train the demo model (``megadiff demo``'s run) and export a generation checkpoint.

    python tools/train_demo_checkpoint.py --out runs/demo_gen [key=value ...]

A stop-gap until ``megadiff demo`` writes checkpoints itself: runs the same config as
``megadiff demo`` (overrides apply on top), then
:func:`megadiff.generation.export.save_generation_checkpoint`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadiff.config import load_config, validate  # noqa: E402
from megadiff.generation.export import save_generation_checkpoint  # noqa: E402
from megadiff.parallel.env import read_launch_env  # noqa: E402
from megadiff.training.demo import DEMO, demo_streams  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*")
    p.add_argument("--data-dir", default="runs/demo_data")
    p.add_argument("--out", default="runs/demo_gen")
    args = p.parse_args()
    from megadiff.parallel.state import destroy_distributed
    from megadiff.training.trainer import Trainer

    streams = demo_streams(args.data_dir)
    world = read_launch_env().world_size
    cfg = validate(load_config(None, [*DEMO, *streams, *args.overrides]), world)
    trainer = Trainer(cfg)
    try:
        trainer.fit()
        out = save_generation_checkpoint(trainer, args.out)
    finally:
        destroy_distributed()
    if out is not None:
        print(f"generation checkpoint: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
