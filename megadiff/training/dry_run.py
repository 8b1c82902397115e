"""``megadiff train CONFIG --dry-run [--world-size N]``: the run's layout at N ranks, checked in
one process, with no real weights.

torch.distributed's ``fake`` backend (``FakeStore``: every collective returns at once) stands
in for the N-rank process group, so megatron-core's ``parallel_state`` builds the real TP/PP/DP
groups. For each pipeline stage the process takes the rank of that stage's first TP/DP
coordinate, builds the stage's model chunks on the meta device (shapes only) and counts their
parameters, which are checked against :func:`megadiff.study.costs.parameter_counts` and the
memory estimate's weights (:mod:`megadiff.machine`). It also prints the pipeline schedule's
shape and how each data stream's rows split over the DP ranks. Exit 0 when everything
matches, 1 when a count differs from the plan.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from megadiff.plan import Plan


@dataclass(frozen=True)
class StageReport:
    stage: int
    rank: int  # the global rank that built it
    params_rank: int  # parameters of one TP rank of this stage
    params_stage: int  # the stage's parameters over its TP ranks (replicated norms once)
    planned_stage: int


def fake_world(cfg, world_size: int, rank: int) -> None:
    """The fake ``world_size`` process group as ``rank``, and megatron-core's groups on it."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        ps.destroy_model_parallel()
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    p = cfg.parallel
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=(p.virtual_pipeline or 1)
        if p.pipeline_parallel > 1 and (p.virtual_pipeline or 1) > 1
        else None,
        create_gloo_process_groups=False,
    )


def buildable(cfg):
    """``cfg`` as this (CPU) process can build it: fp32, the local spec; shapes unchanged."""
    cfg = copy.deepcopy(cfg)
    cfg.train.precision = "fp32"
    cfg.model.transformer_impl = "local"
    cfg.parallel.sequence_parallel = False
    return cfg


def stage_parameters(chunks) -> tuple[int, int]:
    """``(one TP rank's parameters, the stage's over all TP ranks)`` of model chunks."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    mine = stage = 0
    for chunk in chunks:
        for param in chunk.parameters():
            mine += param.numel()
            sharded = getattr(param, "tensor_model_parallel", False)
            stage += param.numel() * (tp if sharded else 1)
    return mine, stage


def build_stages(plan: Plan, world_size: int) -> list[StageReport]:
    from megatron.core import parallel_state as ps

    from megadiff.model.build import build_model
    from megadiff.parallel import cpu_compat
    from megadiff.parallel.state import destroy_distributed
    from megadiff.study.costs import parameter_counts

    cfg = buildable(plan.cfg)
    pp = cfg.parallel.pipeline_parallel
    planned = parameter_counts(cfg.model, pp).per_stage
    cpu_compat.enable()
    reports = []
    try:
        for stage in range(pp):
            rank = stage * (world_size // pp)  # megatron's order: PP is the outermost dimension
            fake_world(cfg, world_size, rank)
            assert ps.get_pipeline_model_parallel_rank() == stage
            mine, total = stage_parameters(build_model(cfg, meta=True))
            reports.append(StageReport(stage, rank, mine, total, planned[stage]))
    finally:
        destroy_distributed()
    return reports


def schedule_shape(plan: Plan) -> list[str]:
    """megatron-core's schedule for the layout and each stage's warm-up / steady / cool-down
    micro-batches (1F1B; interleaved: in model chunks)."""
    p = plan.cfg.parallel
    pp, vpp, n = p.pipeline_parallel, p.virtual_pipeline or 1, plan.n_micro
    if pp == 1:
        return [f"forward_backward_no_pipelining: {n} micro-batches per step, one at a time"]
    if vpp == 1:
        lines = [f"forward_backward_pipelining_without_interleaving (1F1B): {n} micro-batches"]
        for s in range(pp):
            warm = min(pp - s - 1, n)
            lines.append(
                f"  stage {s}: warm-up {warm} forwards, steady {n - warm} (1F1B), "
                f"cool-down {warm} backwards; {warm + 1 if n > warm else n} in flight"
            )
        return lines
    total = n * vpp
    lines = [
        f"forward_backward_pipelining_with_interleaving: {n} micro-batches x {vpp} model "
        f"chunks per stage"
    ]
    for s in range(pp):
        warm = min((pp - s - 1) * 2 + (vpp - 1) * pp, total)
        lines.append(
            f"  stage {s}: warm-up {warm} chunk forwards, steady {total - warm}, "
            f"cool-down {warm} chunk backwards"
        )
    return lines


def stream_rows(proportions: np.ndarray, rows: int) -> np.ndarray:
    """Rows per stream in ``rows`` rows of the loader's weighted round robin (exact shares)."""
    counts = np.zeros(len(proportions), np.int64)
    for _ in range(rows):
        counts[int(np.argmax(proportions * (counts.sum() + 1) - counts))] += 1
    return counts


def data_partition(plan: Plan) -> list[str]:
    """How the streams' rows split over the DP ranks per optimizer step."""
    cfg, dp = plan.cfg, plan.dp
    rows = cfg.train.micro_batch * plan.n_micro
    if cfg.data.source != "mds":
        return [f"synthetic data: {rows} rows per DP rank per step, {dp} DP ranks"]
    props = np.array([s.proportion for s in cfg.data.streams], float)
    props = props / props.sum()
    counts = stream_rows(props, rows)
    lines = [
        f"{dp} DP ranks, each {rows} rows per step ({plan.n_micro} micro-batches of "
        f"{cfg.train.micro_batch}); each stream's epoch is split into {dp} disjoint parts, "
        "one per DP rank (the TP/PP ranks of a replica get its batches from its reader)"
    ]
    for s, share, n in zip(cfg.data.streams, props, counts):
        lines.append(
            f"  {s.name}: share {share:.3f}, {n} rows per DP rank per step, "
            f"{n * dp} per step over all ranks"
        )
    return lines


def dry_run(plan: Plan, world_size: int) -> int:
    """Print the layout report; 0 when the built stages match the plan, else 1."""
    from megadiff.machine import estimate_memory, is_half, parameters_per_rank

    p = plan.cfg.parallel
    print(
        f"dry run at {world_size} ranks: TP {p.tensor_parallel} x PP {p.pipeline_parallel}"
        f"{f' (VPP {p.virtual_pipeline})' if p.virtual_pipeline else ''} x DP {plan.dp} "
        "(fake process group, model on the meta device)"
    )
    reports = build_stages(plan, world_size)
    mem = estimate_memory(plan.cfg, on_gpu=True)
    width = 2 if is_half(plan.cfg, True) else 4
    ok = True
    for r in reports:
        same = r.params_stage == r.planned_stage
        ok &= same
        print(
            f"stage {r.stage} (rank {r.rank}): {r.params_stage:,} parameters "
            f"({'=' if same else '!='} plan {r.planned_stage:,}), {r.params_rank:,} per TP rank "
            f"= {r.params_rank * width / 2**30:.2f} GiB of weights"
        )
    most = max(r.params_rank for r in reports)
    ok &= most == parameters_per_rank(plan.cfg)
    print(
        f"largest rank: {most:,} parameters (plan: {parameters_per_rank(plan.cfg):,}); "
        f"planned memory per rank {mem.describe()}"
    )
    for line in schedule_shape(plan) + data_partition(plan):
        print(line)
    if not ok:
        print("dry run: the built model differs from the plan's parameter counts")
    return 0 if ok else 1
