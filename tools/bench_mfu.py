"""Training throughput and MFU of megadiff on this device (one process).

    python tools/bench_mfu.py examples/tiny_cpu.yaml [--steps 20] [key=value ...]
    python tools/bench_mfu.py examples/1b_gpu.yaml train.precision=bf16
    python tools/bench_mfu.py examples/1b_gpu.yaml train.precision=fp8   # Transformer Engine

First measures the device's dense matmul peak (bf16 on GPU, fp32 on CPU; square matmuls,
median of repeats), then trains ``--steps`` steps of the config and reports tokens/s and model
FLOPs utilisation against that *measured* peak (not the datasheet number):

    FLOPs/token = 6 * (matmul parameters) + 12 * layers * hidden * seq_length

(the second term is bidirectional attention: QK^T and AV over the full sequence, fwd + bwd).
Prints one JSON line with every figure, for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megadiff.config import load_config  # noqa: E402
from megadiff.plan import resolve  # noqa: E402
from megadiff.study import costs  # noqa: E402


def measured_peak_flops(dtype: torch.dtype, device: str, n: int, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times[2:])


def flops_per_token(cfg) -> float:
    return costs.flops_per_token(cfg.model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", help="a megadiff config YAML")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, key=value")
    args = ap.parse_args()
    plan = resolve(
        load_config(
            args.config,
            [
                *args.overrides,
                "logging.progress=false",
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
    times = []
    for i in range(args.warmup + args.steps):
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train_step()
        if on_gpu:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tokens = plan.tokens_per_step
    tps = tokens / step
    fpt = flops_per_token(cfg)
    result = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "config": args.config,
        "overrides": args.overrides,
        "precision": resolve_precision(cfg),
        "transformer_impl": resolve_impl(cfg.model),
        "tokens_per_step": tokens,
        "median_step_s": round(step, 5),
        "tokens_per_s": round(tps, 1),
        "model_tflops_per_s": round(tps * fpt / 1e12, 4),
        "measured_peak_tflops": round(peak / 1e12, 3),
        "peak_dtype": str(peak_dtype).replace("torch.", ""),
        "mfu": round(tps * fpt / peak, 4),
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
    }
    destroy_distributed()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
