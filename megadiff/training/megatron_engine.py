"""The megatron-core engine: DDP + (distributed) optimizer + pipeline schedules, TP/PP/DP."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megadiff.model.build import build_model
from megadiff.model.gather import unwrap
from megadiff.model.reader import SHARDED_METADATA, model_sharded_state
from megadiff.parallel.mcore_compat import init_optimizer_state, keep_adam_step
from megadiff.parallel.state import Ranks, device
from megadiff.plan import Plan
from megadiff.training.engine import StepFn


def wrap_ddp(cfg, chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    return [
        DistributedDataParallel(
            config=c.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0
        )
        for i, c in enumerate(chunks)
    ]


def build_optimizer(plan: Plan, model: list[torch.nn.Module]):
    """megatron-core's optimizer with the plan's physical hyper-parameters."""
    from megatron.core.optimizer import get_megatron_optimizer

    from megadiff.optim.schedule import optimizer_config, param_overrides

    cfg = plan.cfg
    ocfg = optimizer_config(cfg, plan.recipe.physical, model[0].config.bf16)
    return get_megatron_optimizer(ocfg, model, config_overrides=param_overrides(cfg, ocfg))


def count_parameters(model: list[torch.nn.Module]) -> int:
    """Total parameters across all TP/PP ranks (each rank counts its shard; summed)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    local = sum(
        p.numel() if getattr(p, "tensor_model_parallel", False) else p.numel() / tp
        for m in model
        for p in m.parameters()
    )
    t = torch.tensor([local], dtype=torch.float64, device=device())
    dist.all_reduce(t, group=ps.get_model_parallel_group())
    return round(t.item())


class MegatronEngine:
    """Model chunks in megatron-core DDP, its optimizer and its pipeline schedules."""

    name = "megatron"
    optimizer_needs_same_layout = False  # fully_reshardable: any TP/PP/DP layout loads it

    def __init__(self, plan: Plan, ranks: Ranks) -> None:
        from megatron.core.distributed import finalize_model_grads

        self.plan = plan
        self.ranks = ranks
        self.model = wrap_ddp(plan.cfg, build_model(plan.cfg))
        tcfg = self.model[0].config
        tcfg.finalize_model_grads_func = finalize_model_grads
        no_sync = [m.no_sync for m in self.model]
        tcfg.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self.optimizer = build_optimizer(plan, self.model)

    def describe(self) -> str:
        r = self.ranks
        return f"world {r.world} = TP {r.tp} x PP {r.pp} x DP {r.dp}"

    def parameter_count(self) -> int:
        return count_parameters(self.model)

    def set_training(self, training: bool) -> None:
        for m in self.model:
            m.train(training)

    def zero_grads(self) -> None:
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()

    def forward_backward(
        self, microbatches: Iterable[dict[str, Any]], step_fn: StepFn, forward_only: bool
    ) -> torch.Tensor | None:
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg = self.plan.cfg
        batches = list(microbatches)
        iters = [iter(batches) for _ in self.model]
        outputs = get_forward_backward_func()(
            forward_step_func=lambda data, model: step_fn(model, next(data)),
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.model,
            num_microbatches=self.plan.n_micro,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.train.micro_batch,
            forward_only=forward_only,
        )
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return None
        stats = torch.stack([d["stats"] for d in outputs]).sum(0).to(device())
        dist.all_reduce(stats, group=ps.get_data_parallel_group())
        return stats

    def local_grads(self) -> list[torch.Tensor]:
        return [b.grad_data for m in self.model for b in m.buffers]

    def apply_update(self) -> tuple[float | None, bool]:
        applied, grad_norm, _ = self.optimizer.step()
        return grad_norm, applied

    def discard_update(self) -> None:
        """Nothing to undo: gradients are cleared at the start of the next step."""

    def layout(self) -> dict[str, int]:
        r = self.ranks
        vpp = self.plan.cfg.parallel.virtual_pipeline or 1
        return {"world": r.world, "tp": r.tp, "pp": r.pp, "dp": r.dp, "vpp": vpp}

    def full_weights(self, modify: bool) -> contextlib.AbstractContextManager:
        """Every rank holds its shard of each weight already."""
        return contextlib.nullcontext()

    def sharded_state(self, is_loading: bool, optimizer: bool) -> dict[str, Any]:
        state = model_sharded_state(self.model)
        if optimizer:
            init_optimizer_state(self.optimizer)
            state["optimizer"] = self.optimizer.sharded_state_dict(
                dict(state), is_loading=is_loading, metadata=dict(SHARDED_METADATA)
            )
        return state

    def load_sharded_state(self, state: dict[str, Any], optimizer: bool) -> None:
        for i, m in enumerate(self.model):
            unwrap(m).load_state_dict(state[f"model{i}"], strict=True)
        if not optimizer:
            self.optimizer.reload_model_params()  # main (fp32) params <- loaded weights
            return
        # each group's learning-rate range comes from this run's config, not the checkpoint
        # (megatron's param groups carry max_lr/min_lr, which its scheduler reads)
        lr_range = [
            {k: g[k] for k in ("max_lr", "min_lr") if k in g} for g in self.optimizer.param_groups
        ]
        with keep_adam_step(self.optimizer):
            self.optimizer.load_state_dict(state["optimizer"])
        for g, kv in zip(self.optimizer.param_groups, lr_range, strict=True):
            g.update(kv)

    def save_files(self, directory: Path) -> None:
        """Everything is in the sharded state."""

    def load_files(self, directory: Path, optimizer: bool) -> None:
        """Everything is in the sharded state."""

    def close(self) -> None:
        """Nothing to release."""
