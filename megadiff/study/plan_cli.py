"""``megadiff plan CONFIG [key=value ...] [--gpu h100] [--mfu 0.4] [--world-size N] [--json]``:
what a run costs before it starts, from the config alone (no data needed with
``model.vocab_size=...``; no model is built).

Prints the parameters (total, embedding, non-embedding, per pipeline stage), the training FLOPs
per token (:mod:`megadiff.study.costs`), tokens and steps, each rank's memory by part
(:func:`megadiff.machine.estimate_memory`; optimizer state with and without the distributed
optimizer, activations per micro-batch with and without recompute, the micro-batches in flight),
the wall time and GPU-hours at the given MFU, a warning when a rank does not fit the GPU, and the
SDE rule's warnings (critical batch).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from megadiff.config import OPEN_UNIT, ConfigError, load_config
from megadiff.flags import AT_LEAST_1, number
from megadiff.machine import GIB

MIB = 1024**2


@dataclass(frozen=True)
class Gpu:
    memory: int  # bytes, as nvidia-smi reports
    peak_flops: float  # dense bf16 FLOP/s (datasheet)


GPUS = {
    "a100": Gpu(81920 * MIB, 312e12),
    "h100": Gpu(81559 * MIB, 989e12),
    "h200": Gpu(143771 * MIB, 989e12),
    "b200": Gpu(183359 * MIB, 2250e12),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (see examples/); omit for defaults")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.vocab_size=102400")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="the GPU to plan for")
    p.add_argument(
        "--mfu",
        type=number(float, OPEN_UNIT),
        default=0.4,
        help="model FLOPs utilisation assumed for the wall time",
    )
    p.add_argument(
        "--world-size",
        type=number(int, AT_LEAST_1),
        help="ranks (GPUs) of the run (default: TP x PP x parallel.data_parallel, or TP x PP)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def world_size(cfg, given: int | None) -> int:
    p = cfg.parallel
    return given or p.tensor_parallel * p.pipeline_parallel * (p.data_parallel or 1)


def make_plan(cfg, world: int, gpu_name: str, mfu: float) -> dict:
    """The plan as a JSON-able dict (bytes, FLOPs, seconds)."""
    from megadiff.machine import (
        estimate_memory,
        micro_batch_activations,
        micro_batches_in_flight,
        optimizer_bytes,
    )
    from megadiff.plan import resolve
    from megadiff.study.costs import flops_per_token, parameter_counts

    plan = resolve(cfg, world, read_data=False)
    cfg, p, m = plan.cfg, plan.cfg.parallel, plan.cfg.model
    gpu = GPUS[gpu_name]
    counts = parameter_counts(m, p.pipeline_parallel)
    mem = estimate_memory(cfg, on_gpu=True)
    fpt = flops_per_token(m)
    flops = fpt * plan.tokens_per_run
    seconds = flops / (world * gpu.peak_flops * mfu)
    warnings = list(plan.recipe.warnings)
    if mem.total > gpu.memory:
        warnings.append(
            f"a rank needs {mem.total / GIB:.1f} GiB but a {gpu_name} has "
            f"{gpu.memory / GIB:.1f} GiB: use more TP/PP, a smaller train.micro_batch, "
            "model.recompute=full or parallel.distributed_optimizer=true"
        )
    recipe = plan.recipe.recipe
    return {
        "world_size": world,
        "layout": {"tp": p.tensor_parallel, "pp": p.pipeline_parallel, "dp": plan.dp},
        "vocab_size": m.vocab_size,
        "params": counts.to_dict(),
        "flops_per_token": fpt,
        "flops_formula": "6 * (N + V_pad * h) + 12 * L * s * h",
        "tokens": plan.tokens_per_run,
        "steps": cfg.train.steps,
        "tokens_per_step": plan.tokens_per_step,
        "micro_batches_per_step": plan.n_micro,
        "memory": {
            **asdict(mem),
            "total": mem.total,
            "optimizer_distributed": optimizer_bytes(cfg, True, True),
            "optimizer_not_distributed": optimizer_bytes(cfg, True, False),
            "activations_per_micro_batch": {
                r: micro_batch_activations(cfg, True, r) for r in ("none", "full")
            }
            | {"configured": micro_batch_activations(cfg, True)},
            "micro_batches_in_flight": micro_batches_in_flight(cfg, plan.n_micro),
        },
        "gpu": gpu_name,
        "gpu_memory": gpu.memory,
        "gpu_peak_flops": gpu.peak_flops,
        "mfu": mfu,
        "flops": flops,
        "wall_seconds": seconds,
        "gpu_hours": seconds * world / 3600,
        "critical_batch": recipe.batch_crit if recipe else None,
        "warnings": warnings,
    }


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def print_plan(d: dict, cfg) -> None:
    p, mem = d["params"], d["memory"]
    lay = d["layout"]
    print(
        f"layout: {d['world_size']} ranks = TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']}, "
        f"vocabulary {d['vocab_size']:,}"
    )
    print(
        f"parameters: {p['total']:,} total = {p['non_embedding']:,} non-embedding + "
        f"{p['embedding']:,} embedding and output"
    )
    if len(p["per_stage"]) > 1:
        print("  per pipeline stage: " + ", ".join(f"{n:,}" for n in p["per_stage"]))
    print(f"FLOPs per token: {d['flops_per_token']:.4g} = {d['flops_formula']}")
    print(
        f"tokens: {d['tokens']:.4g} in {d['steps']:,} steps of {d['tokens_per_step']:,} "
        f"({d['micro_batches_per_step']} micro-batches per rank per step)"
    )
    dist = "on" if cfg.parallel.distributed_optimizer else "off"
    print(f"memory per rank ({d['gpu']}, {_gib(d['gpu_memory'])}):")
    print(f"  weights      {_gib(mem['weights'])}")
    print(f"  gradients    {_gib(mem['gradients'])}")
    print(
        f"  optimizer    {_gib(mem['optimizer'])} (distributed optimizer {dist}; with it "
        f"{_gib(mem['optimizer_distributed'])}, without {_gib(mem['optimizer_not_distributed'])})"
    )
    acts = mem["activations_per_micro_batch"]
    print(
        f"  activations  {_gib(mem['activations'])} = {mem['micro_batches_in_flight']} "
        f"micro-batch(es) in flight x {_gib(acts['configured'])} (model.recompute="
        f"{cfg.model.recompute}; none {_gib(acts['none'])}, full {_gib(acts['full'])})"
    )
    print(f"  runtime      {_gib(mem['runtime'])}")
    print(f"  total        {_gib(mem['total'])}")
    print(
        f"compute: {d['flops']:.4g} FLOPs; at MFU {d['mfu']:g} of {d['gpu_peak_flops'] / 1e12:g} "
        f"TFLOP/s: {d['wall_seconds'] / 86400:.2f} days wall on {d['world_size']} GPUs, "
        f"{d['gpu_hours']:,.0f} GPU-hours"
    )
    if d["critical_batch"] is not None:
        print(f"critical batch (SDE rule): {d['critical_batch']:.4g} sequences")
    for w in d["warnings"]:
        print(f"warning: {w}")


def run(args: argparse.Namespace) -> int:
    from megadiff.training.cli import split_config_arg

    try:
        path, overrides = split_config_arg(args)
        cfg = load_config(path, overrides)
        world = world_size(cfg, args.world_size)
        d = make_plan(cfg, world, args.gpu, args.mfu)
    except ConfigError as e:
        hint = ""
        if "vocabulary" in str(e):
            hint = "; to plan without the data, give model.vocab_size=N"
        print(f"megadiff plan: error: {e}{hint}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(d, indent=1))
    else:
        from megadiff.plan import resolve

        print_plan(d, resolve(cfg, world, read_data=False).cfg)
    return 0
