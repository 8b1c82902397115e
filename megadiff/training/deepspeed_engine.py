"""``train.engine: deepspeed``: data-parallel training with DeepSpeed ZeRO 0/1/2/3.

The same megatron-core ``MaskedDiffusionModel`` (TP = PP = 1, built after ``init_distributed``),
AdamW hyper-parameters (``optim.logical`` included), parameter groups and gradient clipping as
the megatron-core engine; the training loop, data, noise, loss, lr schedule, checkpoints and
fault handling are the shared ones (:mod:`megadiff.training.trainer`). Only the data-parallel
machinery is DeepSpeed's.

Checkpoints: the model goes into the shared ``dist_checkpointing`` state (so export,
generation and ``checkpoint.load`` at any layout read it like any other), the optimizer into
DeepSpeed's own files under ``deepspeed/`` (loadable at the same DP size and ZeRO stage).

On CPU DeepSpeed talks over the existing gloo group. Its shared-memory all-reduce op (JIT
compiled on first use, and leaving ~69 MB files in /dev/shm when ``LOCAL_SIZE`` equals the world
size) serves inference only, so it is not built; files it may have left are removed on close.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megadiff.config import Config, merge_dicts
from megadiff.model.build import build_model
from megadiff.model.reader import model_sharded_state
from megadiff.optim.rescale import OptimHParams
from megadiff.parallel.env import read_launch_env
from megadiff.parallel.state import Ranks
from megadiff.plan import Plan
from megadiff.training.engine import StepFn

NATIVE_DIR = "deepspeed"  # DeepSpeed's own checkpoint files, inside a megadiff checkpoint


def deepspeed_config(plan: Plan, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (``deepspeed.extra`` merged last)."""
    cfg, hp = plan.cfg, plan.recipe.physical
    d = cfg.deepspeed
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
        "gradient_accumulation_steps": plan.n_micro,
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
    return merge_dicts(out, d.extra)


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


class DeepSpeedEngine:
    """A DeepSpeed engine around the model, with AdamW from the plan's recipe."""

    name = "deepspeed"
    optimizer_needs_same_layout = True  # ZeRO partitions: same DP size and stage

    def __init__(self, plan: Plan, ranks: Ranks) -> None:
        if not torch.cuda.is_available():  # say CPU, not "unable to detect" a GPU (a warning)
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        self.plan = plan
        self.ranks = ranks
        (model,) = build_model(plan.cfg)
        bf16 = model.config.bf16
        _skip_shm_comm_op()
        # DeepSpeed asserts LOCAL_RANK is set (torchrun sets it; a single process or srun not)
        os.environ.setdefault("LOCAL_RANK", str(read_launch_env().local_rank))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(plan.cfg, model, plan.recipe.physical, bf16),
            config=deepspeed_config(plan, bf16),
            dist_init_required=False,
        )
        self.model = [self.engine]
        self.stage = plan.cfg.deepspeed.zero_stage

    def describe(self) -> str:
        return f"deepspeed ZeRO-{self.stage}, DP {self.ranks.dp}"

    def parameter_count(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.parameters())

    def set_training(self, training: bool) -> None:
        self.engine.train(training)

    def zero_grads(self) -> None:
        """DeepSpeed clears gradients itself after each update."""

    def forward_backward(
        self, microbatches: Iterable[dict[str, Any]], step_fn: StepFn, forward_only: bool
    ) -> torch.Tensor | None:
        """Forward (and backward) each micro-batch; DeepSpeed scales each loss by 1/n_micro and
        reduces the gradients at the last backward. The update itself (the last micro-batch's
        ``engine.step()``) is :meth:`apply_update`."""
        batches = list(microbatches)
        stats = None
        for i, batch in enumerate(batches):
            with torch.no_grad() if forward_only else contextlib.nullcontext():
                output, loss_fn = step_fn(self.engine, batch)
                loss, extra = loss_fn(output)
            if not forward_only:
                self.engine.backward(loss)
                if i < len(batches) - 1:
                    self.engine.step()  # inside the accumulation window: no update
            stats = extra["stats"] if stats is None else stats + extra["stats"]
        stats = stats.to(loss.device)
        dist.all_reduce(stats)
        return stats

    def local_grads(self) -> list[torch.Tensor]:
        grads = [p.grad for p in self.engine.parameters() if p.grad is not None]
        partitions = getattr(self.optimizer, "averaged_gradients", None) or {}
        for part in partitions.values():
            grads += [g for g in part or [] if g is not None]
        return grads

    def apply_update(self) -> tuple[float | None, bool]:
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        return grad_norm, self.engine.skipped_steps == skipped_before

    def discard_update(self) -> None:
        """DeepSpeed's own step with the inner optimizer's update switched off: its counters
        advance and gradients are cleared as after any step; weights and moments stay."""
        inner = self.optimizer
        while not isinstance(inner, torch.optim.Optimizer):
            inner = inner.optimizer
        inner.step = lambda *args, **kwargs: None
        try:
            self.engine.step()
        finally:
            del inner.step

    def layout(self) -> dict[str, int]:
        r = self.ranks
        return {"world": r.world, "tp": 1, "pp": 1, "dp": r.dp, "vpp": 1, "zero": self.stage}

    @contextlib.contextmanager
    def full_weights(self, modify: bool) -> Iterator[None]:
        """ZeRO-3 keeps each rank's slice of every parameter: gather them while in use (and
        with ``modify``, scatter rank 0's values back on exit)."""
        if self.stage < 3:
            yield
            return
        import deepspeed

        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield

    def sharded_state(self, is_loading: bool, optimizer: bool) -> dict[str, Any]:
        return model_sharded_state([self.engine.module])

    def load_sharded_state(self, state: dict[str, Any], optimizer: bool) -> None:
        self.engine.module.load_state_dict(state["model0"], strict=True)

    def save_files(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=NATIVE_DIR, save_latest=False)

    def load_files(self, directory: Path, optimizer: bool) -> None:
        if optimizer:
            self.engine.load_checkpoint(
                str(directory),
                tag=NATIVE_DIR,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )

    def close(self) -> None:
        """Release DeepSpeed's state and any shared-memory files it left (rank 0 removes)."""
        self.engine.destroy()
        if self.ranks.rank == 0:
            for f in shm_leftovers():
                Path(f).unlink(missing_ok=True)
