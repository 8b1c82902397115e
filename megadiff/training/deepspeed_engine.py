"""``train.engine: deepspeed``: data-parallel training with DeepSpeed ZeRO 0/1/2/3.

The same megatron-core ``MaskedDiffusionModel`` (TP = PP = 1, built after ``init_distributed``),
the same masking objective, noise keys, data source, AdamW hyper-parameters (``optim.logical``
included), parameter groups, lr/wd schedule and gradient clipping as the megatron-core engine,
and the same ``metrics.jsonl`` contract; only the data-parallel machinery is DeepSpeed's.

On CPU DeepSpeed talks over the existing gloo group. Its shared-memory all-reduce op (JIT
compiled on first use, and leaving ~69 MB files in /dev/shm when ``LOCAL_SIZE`` equals the world
size) serves inference only, so it is not built; files it may have left are removed on close.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megadiff.config import Config, num_microbatches
from megadiff.data.source import build_source
from megadiff.diffusion.objective import MaskingObjective
from megadiff.model.build import build_model
from megadiff.optim.rescale import OptimHParams
from megadiff.parallel.env import read_launch_env
from megadiff.parallel.state import Ranks, device, init_distributed
from megadiff.training.metrics import open_run, step_record
from megadiff.training.trainer import forward_microbatch, tokens_per_step


def deepspeed_config(cfg: Config, hp: OptimHParams, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (``deepspeed.extra`` merged last)."""
    d = cfg.deepspeed
    dp = cfg.parallel.data_parallel or 1
    zero: dict[str, Any] = {
        "stage": d.zero_stage,
        "overlap_comm": d.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": d.bucket_size,
        "allgather_bucket_size": d.bucket_size,
    }
    out: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": cfg.train.global_batch // (cfg.train.micro_batch * dp),
        "gradient_clipping": cfg.optim.clip_grad,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": hp.lr,
                "betas": [hp.beta1, hp.beta2],
                "eps": hp.eps,
                "weight_decay": hp.weight_decay,
                "torch_adam": True,  # torch.optim.AdamW: no JIT-compiled ops
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(out, d.extra)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _skip_shm_comm_op() -> None:
    """DeepSpeed's CPU shared-memory all-reduce is inference-only: don't JIT-build it."""
    if torch.cuda.is_available():
        return
    import importlib

    # not `import deepspeed.comm.torch as m`: deepspeed.comm's `torch` attribute is torch itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def shm_leftovers() -> list[str]:
    """Files DeepSpeed's shared-memory op leaves in /dev/shm for this user."""
    return sorted(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"))


def param_groups(cfg: Config, model: torch.nn.Module, hp: OptimHParams, bf16: bool) -> list[dict]:
    """megatron-core's parameter groups (no weight decay on norms; CompleteP lr/eps groups)."""
    from megatron.core.optimizer import _get_param_groups

    from megadiff.optim.schedule import optimizer_config, param_overrides

    ocfg = optimizer_config(cfg, hp, bf16)
    groups = _get_param_groups([model], ocfg, param_overrides(cfg, ocfg))
    return [g for g in groups if g["params"]]


class DeepSpeedTrainer:
    """Owns the DeepSpeed engine, scheduler, data source and counters of one run."""

    def __init__(self, cfg: Config) -> None:
        import deepspeed

        from megadiff.optim.recipe import physical_hparams
        from megadiff.optim.schedule import build_scheduler

        self.cfg = cfg
        self.ranks: Ranks = init_distributed(cfg)
        self.device = device()
        self.n_micro = num_microbatches(cfg)
        (model,) = build_model(cfg)
        bf16 = model.config.bf16
        hp, self.recipe_lines = physical_hparams(cfg)
        _skip_shm_comm_op()
        # DeepSpeed asserts LOCAL_RANK is set (torchrun sets it; a single process or srun not)
        os.environ.setdefault("LOCAL_RANK", str(read_launch_env().local_rank))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(cfg, model, hp, bf16),
            config=deepspeed_config(cfg, hp, bf16),
            dist_init_required=False,
        )
        self.model = [self.engine]
        self.scheduler = build_scheduler(cfg, self.optimizer, hp)
        self.source = build_source(cfg, self.ranks.dp_rank, self.ranks.dp, self.device)
        self.objective = MaskingObjective.for_source(cfg.diffusion, self.source)
        self.step = 0
        self.tokens = 0
        self.metrics = open_run(cfg, self.ranks.is_logger)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step: ``n_micro`` forward/backward passes, then DeepSpeed's step."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self.engine.train()
        mbs = self.source.microbatches(
            self.step,
            cfg.train.global_batch,
            cfg.train.micro_batch,
            self.ranks.dp_rank,
            self.n_micro,
        )
        stats = None
        skipped_before = getattr(self.engine, "skipped_steps", 0)
        for batch in mbs:
            out, noised = forward_microbatch(
                self.engine,
                self.objective,
                cfg,
                self.step,
                self.ranks,
                self.n_micro,
                batch,
                self.device,
            )
            loss, s = self.objective.loss(out, noised)
            self.engine.backward(loss)  # scaled by 1/gradient_accumulation_steps
            self.engine.step()  # steps the optimizer at the accumulation boundary only
            stats = s if stats is None else stats + s
        stats = stats.to(self.device)
        dist.all_reduce(stats)
        grad_norm = self.engine.get_global_grad_norm()
        step_tokens = tokens_per_step(cfg)
        self.scheduler.step(increment=step_tokens)
        self.step += 1
        self.tokens += step_tokens
        return step_record(
            self.step,
            stats,
            self.tokens,
            self.optimizer.param_groups[0]["lr"],
            grad_norm,
            step_tokens,
            time.perf_counter() - t0,
            skipped=skipped_before != getattr(self.engine, "skipped_steps", 0),
        )

    def fit(self) -> list[dict[str, Any]]:
        r = self.ranks
        n = sum(
            p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.engine.parameters()
        )
        self.metrics.info(
            f"megadiff: deepspeed ZeRO-{self.cfg.deepspeed.zero_stage}, DP {r.dp}, "
            f"{self.n_micro} micro-batch(es)/step, "
            f"{tokens_per_step(self.cfg):,} tokens/step, "
            f"{n:,} parameters, run dir {self.cfg.run.dir}"
        )
        for line in self.recipe_lines:
            self.metrics.info(line)
        history = []
        while self.step < self.cfg.train.steps:
            record = self.train_step()
            self.metrics.log(record)
            history.append(record)
        self.metrics.close()
        return history

    def close(self) -> None:
        """Release DeepSpeed's state and any shared-memory files it left (rank 0 removes)."""
        self.engine.destroy()
        if self.ranks.rank == 0:
            for f in shm_leftovers():
                Path(f).unlink(missing_ok=True)
