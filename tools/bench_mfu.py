"""Training throughput and MFU of megadiff on this device (one process), and of its bare
PyTorch twin.

    python tools/bench_mfu.py examples/tiny_cpu.yaml [--steps 20] [key=value ...]
    python tools/bench_mfu.py examples/1b_gpu.yaml --twin --compile train.precision=bf16
    python tools/bench_mfu.py examples/1b_gpu.yaml train.precision=fp8   # FP8 GEMMs

First measures the device's dense matmul peak (bf16 on GPU, fp32 on CPU; square matmuls,
median of repeats), then trains ``--steps`` steps of the config and reports tokens/s and model
FLOPs utilisation against that *measured* peak (not the datasheet number):

    FLOPs/token = 6 * (matmul parameters) + 12 * layers * hidden * seq_length

(the second term is bidirectional attention: QK^T and AV over the full sequence, fwd + bwd).
``--twin`` then trains the bare PyTorch twin (tools/bare_twin.py: same model, weights, batches,
noise and objective; bf16 autocast on GPU) for the same steps, ``--compile`` also under
``torch.compile``, and reports megadiff's tokens/s as a fraction of each. Prints one JSON line
with every figure (``--out FILE`` appends it there too); ``--summary FILE`` prints such a
file as the Markdown table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TOOLS), TOOLS]  # megadiff (from a checkout) and bare_twin

from bare_twin import bare_step, build_twin, trainer_weights  # noqa: E402  (tools/)

from megadiff.config import load_config  # noqa: E402
from megadiff.flags import HelpFormatter  # noqa: E402
from megadiff.plan import resolve  # noqa: E402
from megadiff.study import costs  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measured_peak_flops(dtype: torch.dtype, device: str, n: int, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 2):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times[2:])


def flops_per_token(cfg) -> float:
    return costs.flops_per_token(cfg.model)


def timed_steps(step: Callable[[int], float | None], warmup: int, steps: int):
    """(median seconds per timed step, the last step's loss)."""
    times, loss = [], None
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss = step(i)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), loss


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("config", nargs="?", help="a megadiff config YAML")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--twin", action="store_true", help="also time the bare PyTorch twin")
    ap.add_argument("--compile", action="store_true", help="also time the twin compiled")
    ap.add_argument("--out", help="append the JSON line to this file as well")
    ap.add_argument("--summary", metavar="FILE", help="print FILE's results as a table, exit")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, key=value")
    return ap


def summary_table(lines: list[dict]) -> str:
    """The results as a Markdown table (one row per run)."""

    def twin(r: dict, key: str, field: str) -> str:
        if key not in r:
            return "-"
        value = r[key][field]
        return f"{value:,.0f}" if field == "tokens_per_s" else f"{value:.4g}"

    rows = [
        "| config | overrides | precision | tokens/s | MFU | twin tokens/s (eager / compiled) "
        "| megadiff / twin (eager / compiled) | final loss (megadiff / twin) | max GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in lines:
        rows.append(
            f"| {os.path.basename(r['config'])} | {' '.join(r['overrides'])} | "
            f"{r['precision']} ({r['transformer_impl']}) | {r['tokens_per_s']:,.0f} | "
            f"{r['mfu']:.3f} | {twin(r, 'twin', 'tokens_per_s')} / "
            f"{twin(r, 'twin_compiled', 'tokens_per_s')} | "
            f"{twin(r, 'twin', 'megadiff_over_twin')} / "
            f"{twin(r, 'twin_compiled', 'megadiff_over_twin')} | "
            f"{r['final_loss']:.4f} / {twin(r, 'twin', 'final_loss')} | {r['max_memory_gib']} |"
        )
    return "\n".join(rows)


def main() -> None:
    args = build_parser().parse_intermixed_args()
    if args.summary:
        with open(args.summary) as f:
            print(summary_table([json.loads(line) for line in f if line.strip()]))
        return
    if not args.config:
        build_parser().error("give a config YAML (or --summary FILE)")
    plan = resolve(
        load_config(
            args.config,
            [
                *args.overrides,
                "logging.progress=false",
                "logging.tensorboard=false",
                "run.dir=/tmp/megadiff-bench-mfu",
                f"train.steps={args.warmup + args.steps}",
            ],
        ),
        1,
    )
    cfg = plan.cfg
    from megadiff.model.build import resolve_precision
    from megadiff.model.specs import resolve_impl
    from megadiff.parallel.state import destroy_distributed
    from megadiff.training.trainer import Trainer

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    peak_dtype = torch.bfloat16 if on_gpu else torch.float32
    peak = measured_peak_flops(peak_dtype, device, 8192 if on_gpu else 1024)
    trainer = Trainer(plan)
    weights = trainer_weights(trainer) if args.twin or args.compile else None
    step_s, loss = timed_steps(lambda i: trainer.train_step().get("loss"), args.warmup, args.steps)
    tokens = plan.tokens_per_step
    tps = tokens / step_s
    fpt = flops_per_token(cfg)
    result = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "config": args.config,
        "overrides": args.overrides,
        "precision": resolve_precision(cfg),
        "transformer_impl": resolve_impl(cfg.model),
        "steps": args.steps,
        "tokens_per_step": tokens,
        "median_step_s": round(step_s, 5),
        "tokens_per_s": round(tps, 1),
        "final_loss": loss,
        "model_tflops_per_s": round(tps * fpt / 1e12, 4),
        "measured_peak_tflops": round(peak / 1e12, 3),
        "peak_dtype": str(peak_dtype).replace("torch.", ""),
        "mfu": round(tps * fpt / peak, 4),
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
    }
    for name, compiled in (("twin", False), ("twin_compiled", True)):
        if not (args.twin or args.compile) or (compiled and not args.compile):
            continue
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model, opt, autocast = build_twin(trainer, weights, compile_model=compiled)
        twin_s, twin_loss = timed_steps(
            lambda i, m=model, o=opt, a=autocast: bare_step(m, o, trainer, i, a),
            args.warmup,
            args.steps,
        )
        result[name] = {
            "median_step_s": round(twin_s, 5),
            "tokens_per_s": round(tokens / twin_s, 1),
            "final_loss": twin_loss,
            "mfu": round(tokens / twin_s * fpt / peak, 4),
            "megadiff_over_twin": round(twin_s / step_s, 4),
            "max_memory_gib": (
                round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None
            ),
        }
        del model, opt
    destroy_distributed()
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
