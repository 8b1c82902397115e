"""How much does the held-out estimate of one checkpoint move with the eval noise seed?

    python tools/eval_variance.py RUN_DIR [--seeds 5] [key=value ...]

Loads the newest checkpoint of ``RUN_DIR`` (a finished ``megadiff train``/``demo`` run; its
``config.yaml`` is the base config, ``key=value`` overrides apply on top, e.g.
``eval.t_points=8``) in a one-process world and scores its held-out set (``eval.*``;
``megadiff/training/evaluation.py``) once per ``eval.seed`` in ``0..seeds-1``: the same
sequences, other t offsets and masks. Prints each seed's ``val_loss`` and per-modality values
and the spread, ``(max - min) / mean``. Nothing is written to ``RUN_DIR``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megadiff.parallel.launch import run_world  # noqa: E402


def score_seeds(config: str, overrides: list[str], seeds: int) -> list[dict]:
    """The eval values of the loaded checkpoint for ``eval.seed`` = 0..seeds-1."""
    from megadiff.config import load_config
    from megadiff.parallel.state import destroy_distributed
    from megadiff.plan import resolve
    from megadiff.training.evaluation import Evaluator
    from megadiff.training.trainer import Trainer

    trainer = Trainer(resolve(load_config(config, overrides), 1))
    out = []
    for seed in range(seeds):
        trainer.cfg.eval.seed = seed
        trainer.evaluator = Evaluator(trainer)
        out.append(trainer.evaluator.run())
    trainer.close()
    destroy_distributed()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a finished run's directory (config.yaml, checkpoints/)")
    p.add_argument("--seeds", type=int, default=5, help="eval seeds 0..N-1")
    p.add_argument("overrides", nargs="*", help="dotted overrides on the run's config")
    args = p.parse_intermixed_args()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"checkpoint.load={os.path.join(args.run_dir, 'checkpoints')}",
            "checkpoint.load_optimizer=false",
            "parallel.data_parallel=null",
            "eval.every=1",
            "logging.progress=false",
            "logging.tensorboard=false",
            *args.overrides,
            f"run.dir={tmp}",
        ]
        config = os.path.join(args.run_dir, "config.yaml")
        results = run_world(score_seeds, 1, (config, overrides, args.seeds))[0]
    keys = [k for k in results[0] if k.startswith("val_loss")]
    print("seed  " + "  ".join(f"{k:>22}" for k in keys))
    for seed, r in enumerate(results):
        print(f"{seed:>4}  " + "  ".join(f"{r[k]:>22.4f}" for k in keys))
    for k in keys:
        vals = [r[k] for r in results]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1)) ** 0.5
        print(
            f"{k}: mean {mean:.4f}, std {std:.4f} ({100 * std / mean:.2f}%), "
            f"spread (max-min)/mean {100 * (max(vals) - min(vals)) / mean:.2f}%"
        )
    print(f"eval time per seed: {sum(r['val_time'] for r in results) / len(results):.1f}s")


if __name__ == "__main__":
    main()
