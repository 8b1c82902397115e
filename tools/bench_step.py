"""A megadiff training step vs a bare PyTorch loop on the same model, data and objective.

    python tools/bench_step.py [--config examples/tiny_cpu.yaml] [--steps 30] [key=value ...]

The bare loop is the plain-PyTorch twin of the run (tools/bare_twin.py: the same model,
batches, masking noise and objective, ``torch.optim.AdamW``, gradient clipping, micro-batch
accumulation). Both run single-process in fp32 on this device. Prints the median wall time and
process CPU time (user + system, all threads) per step of each and their ratios, and a verdict:
PASS when the CPU-time ratio (the steadier one on a shared box) is at most ``--target`` (1.15),
else FAIL.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TOOLS), TOOLS]  # megadiff (from a checkout) and bare_twin

from bare_twin import bare_step, build_twin  # noqa: E402  (tools/, beside this script)

from megadiff.config import load_config  # noqa: E402
from megadiff.flags import HelpFormatter  # noqa: E402
from megadiff.plan import resolve  # noqa: E402
from megadiff.training.trainer import Trainer  # noqa: E402

TARGET = 1.15  # megadiff / bare CPU time per step


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--config", default="examples/tiny_cpu.yaml", help="training config (YAML)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps of each loop")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument(
        "--target",
        type=float,
        default=TARGET,
        help="PASS when megadiff's CPU time per step is at most this times the bare loop's",
    )
    ap.add_argument(
        "overrides", nargs="*", help="dotted config overrides, e.g. model.hidden_size=128"
    )
    return ap


def verdict(ratio: float, target: float) -> str:
    """``PASS`` when ``ratio <= target``, else ``FAIL``, with both numbers."""
    word = "PASS" if ratio <= target else "FAIL"
    return f"{word} (CPU ratio {ratio:.3f} {'<=' if word == 'PASS' else '>'} target {target:g})"


def main() -> int:
    args = build_parser().parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    plan = resolve(
        load_config(
            args.config,
            [*args.overrides, "logging.progress=false", "run.dir=/tmp/megadiff-bench-step"],
        ),
        1,
    )
    trainer = Trainer(plan)
    ref, opt, _ = build_twin(trainer)
    times: dict[str, list[float]] = {"megadiff": [], "bare": []}
    cpu: dict[str, list[float]] = {"megadiff": [], "bare": []}
    for i in range(args.warmup + args.steps):
        # alternate the two so background load affects both alike
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step()
        t1, c1 = time.perf_counter(), time.process_time()
        bare_step(ref, opt, trainer, i)
        t2, c2 = time.perf_counter(), time.process_time()
        if i >= args.warmup:
            times["megadiff"].append(t1 - t0)
            times["bare"].append(t2 - t1)
            cpu["megadiff"].append(c1 - c0)
            cpu["bare"].append(c2 - c1)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    tokens = plan.tokens_per_step
    print(
        f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, "
        f"threads: {torch.get_num_threads()}, steps: {args.steps}, tokens/step: {tokens}"
    )
    for k, v in med.items():
        print(
            f"{k:>9}: median step {v * 1e3:8.2f} ms wall, {cmed[k] * 1e3:8.2f} ms CPU  "
            f"({tokens / v:,.0f} tokens/s)"
        )
    ratio = cmed["megadiff"] / cmed["bare"]
    print(
        f"    ratio: megadiff / bare = {med['megadiff'] / med['bare']:.3f} wall, "
        f"{ratio:.3f} CPU  (target <= {args.target:g}); load average {os.getloadavg()[0]:.1f}"
    )
    print(f"  verdict: {verdict(ratio, args.target)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
