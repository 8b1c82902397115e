"""The training loop on megatron-core: DDP + (distributed) optimizer + pipeline schedules."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megadiff.config import Config, num_microbatches
from megadiff.data.source import build_source
from megadiff.diffusion.objective import MaskingObjective, noise_generator, summarize
from megadiff.model.build import build_model, transformer_config
from megadiff.parallel.state import Ranks, device, init_distributed
from megadiff.training import checkpoint as ckpt
from megadiff.training.faults import (
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_REQUEUE,
    StopRequest,
    nonfinite_anywhere,
)
from megadiff.training.metrics import open_run, step_record


def wrap_ddp(cfg: Config, chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
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


def build_optimizer(cfg: Config, model: list[torch.nn.Module]):
    from megatron.core.optimizer import get_megatron_optimizer

    from megadiff.optim.recipe import physical_hparams
    from megadiff.optim.schedule import build_scheduler, optimizer_config, param_overrides

    hp, _ = physical_hparams(cfg)  # optim.* as given, or rescaled from optim.logical
    ocfg = optimizer_config(cfg, hp, model[0].config.bf16)
    opt = get_megatron_optimizer(ocfg, model, config_overrides=param_overrides(cfg, ocfg))
    return opt, build_scheduler(cfg, opt, hp)


def tokens_per_step(cfg: Config) -> int:
    return cfg.train.global_batch * cfg.model.seq_length


def forward_microbatch(
    model: torch.nn.Module,
    objective: MaskingObjective,
    cfg: Config,
    step: int,
    ranks: Ranks,
    n_micro: int,
    batch: dict[str, Any],
    dev: torch.device,
):
    """Mask one micro-batch with the noise keyed by (seed, step, DP rank, micro-batch) and run
    ``model`` on it; returns ``(output, noised)`` (both engines train through this)."""
    gen = noise_generator(cfg.train.seed, step, ranks.dp_rank, batch["microbatch"], n_micro)
    noised = objective.corrupt(batch["tokens"], batch["modality"], gen)
    mask = noised.attention_mask
    out = model(noised.inputs.to(dev), None if mask is None else mask.to(dev))
    return out, noised


class Trainer:
    """Owns the model chunks, optimizer, scheduler, data source and counters of one run."""

    def __init__(self, cfg: Config) -> None:
        from megatron.core.distributed import finalize_model_grads

        self.cfg = cfg
        self.ranks: Ranks = init_distributed(cfg)
        self.device = device()
        # checked before the model is built: a bad checkpoint.load fails fast
        start_from = ckpt.resume_source(cfg)
        self.n_micro = num_microbatches(cfg)
        self.tcfg = transformer_config(cfg)
        chunks = build_model(cfg)
        self.model = wrap_ddp(cfg, chunks)
        tcfg = self.model[0].config
        tcfg.finalize_model_grads_func = finalize_model_grads
        no_sync = [m.no_sync for m in self.model]
        tcfg.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
        self.source = build_source(cfg, self.ranks.dp_rank, self.ranks.dp, self.device)
        self.objective = MaskingObjective.for_source(cfg.diffusion, self.source)
        self.step = 0
        self.tokens = 0
        self.nonfinite_steps = 0
        self.exit_code = EXIT_OK
        self.saved_step: int | None = None
        self.saver = ckpt.AsyncSaver() if cfg.checkpoint.async_save else None
        self.restored: ckpt.Restored | None = None
        if start_from is not None:
            path, own = start_from
            c = cfg.checkpoint
            self.restored = ckpt.load_checkpoint(
                self,
                path,
                optimizer=own or c.load_optimizer,
                counters=own or not c.reset_step,
            )
            self.saved_step = self.step if own else None
        self.metrics = open_run(cfg, self.ranks.is_logger, self.step)

    # ------------------------------------------------------------------ one step

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        out, noised = forward_microbatch(
            model, self.objective, self.cfg, self.step, self.ranks, self.n_micro, batch, self.device
        )
        return out, partial(self._loss_func, noised)

    def _loss_func(self, noised, output):
        loss, stats = self.objective.loss(output, noised)
        return loss, {"stats": stats}

    def forward_backward(self, forward_only: bool = False) -> torch.Tensor | None:
        """Run all micro-batches of this step; returns the DP-summed stats on the last stage."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg = self.cfg
        mbs = self.source.microbatches(
            self.step,
            cfg.train.global_batch,
            cfg.train.micro_batch,
            self.ranks.dp_rank,
            self.n_micro,
        )
        iters = [iter(mbs) for _ in self.model]
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.model,
            num_microbatches=self.n_micro,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.train.micro_batch,
            forward_only=forward_only,
        )
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return None
        stats = torch.stack([d["stats"] for d in losses]).sum(0).to(self.device)
        dist.all_reduce(stats, group=ps.get_data_parallel_group())
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        """Forward-only loss of the current step's batch and noise (no update).

        Returns the summarized stats on the last pipeline stage, None on other ranks.
        """
        for m in self.model:
            m.eval()
        stats = self.forward_backward(forward_only=True)
        for m in self.model:
            m.train()
        return None if stats is None else summarize(stats.cpu())

    def train_step(self, on_grads: Callable[[Trainer], None] | None = None) -> dict[str, Any]:
        """One optimizer step. ``on_grads(trainer)`` runs after the gradients are reduced."""
        t0 = time.perf_counter()
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        stats = self.forward_backward()
        if on_grads is not None:
            on_grads(self)
        step_tokens = tokens_per_step(self.cfg)
        grads = [b.grad_data for m in self.model for b in m.buffers]
        if nonfinite_anywhere(stats, grads):
            # no update; with train.nonfinite=stop the step is not counted either
            ok, grad_norm, nonfinite = False, float("nan"), True
            if self.cfg.train.nonfinite == "stop":
                return {"step": self.step + 1, "nonfinite": True, "skipped": True}
            self.nonfinite_steps += 1
        else:
            ok, grad_norm, _ = self.optimizer.step()
            nonfinite = False
            self.scheduler.step(increment=step_tokens)
        self.step += 1
        self.tokens += step_tokens
        record = step_record(
            self.step,
            stats,
            self.tokens,
            self.optimizer.param_groups[0]["lr"],
            grad_norm,
            step_tokens,
            time.perf_counter() - t0,
            skipped=not ok,
        )
        if nonfinite:
            record.update(nonfinite=True, nonfinite_steps=self.nonfinite_steps)
        return record

    # ------------------------------------------------------------------ state

    def counters(self) -> dict[str, int]:
        """Progress saved in checkpoints (the scheduler keeps its own, in tokens)."""
        return {"step": self.step, "tokens": self.tokens, "nonfinite_steps": self.nonfinite_steps}

    def load_counters(self, counters: dict[str, int]) -> None:
        self.step = int(counters["step"])
        self.tokens = int(counters["tokens"])
        self.nonfinite_steps = int(counters.get("nonfinite_steps", 0))

    def save_checkpoint(self) -> Path | None:
        """Collective: checkpoint the current step (once per step)."""
        if self.saved_step == self.step:
            return None
        path = ckpt.save_checkpoint(self, self.saver)
        self.saved_step = self.step
        return path

    # ------------------------------------------------------------------ loop

    def fit(self) -> list[dict[str, Any]]:
        from megadiff.optim.recipe import physical_hparams

        r = self.ranks
        self.metrics.info(
            f"megadiff: world {r.world} = TP {r.tp} x PP {r.pp} x DP {r.dp}, "
            f"{self.n_micro} micro-batch(es)/step, {tokens_per_step(self.cfg):,} tokens/step, "
            f"{count_parameters(self.model):,} parameters, run dir {self.cfg.run.dir}"
        )
        for line in physical_hparams(self.cfg)[1]:
            self.metrics.info(line)
        if self.restored is not None:
            self.metrics.info(f"megadiff: resumed from {self.restored.path} at step {self.step}")
        cfg = self.cfg
        every = cfg.checkpoint.every
        stop = StopRequest(cfg.train.exit_after_minutes).install()
        history: list[dict[str, Any]] = []
        try:
            while self.step < cfg.train.steps:
                record = self.train_step()
                if record.get("nonfinite"):
                    how = "skipped" if cfg.train.nonfinite == "skip" else "stopping"
                    ckpt.log_rank0(
                        f"step {record['step']}: non-finite loss or gradients; {how} "
                        f"(train.nonfinite={cfg.train.nonfinite})"
                    )
                    if cfg.train.nonfinite == "stop":
                        self.exit_code = EXIT_NONFINITE
                        break
                self.metrics.log(record)
                history.append(record)
                if self.saver is not None:
                    self.saver.poll()
                if stop.should_stop():
                    ckpt.log_rank0(f"stopping at step {self.step}: {stop.reason}")
                    self.exit_code = EXIT_REQUEUE
                    break
                if every and self.step % every == 0:
                    self.save_checkpoint()
            if cfg.checkpoint.save_on_exit or self.exit_code != EXIT_OK:
                self.save_checkpoint()
            if self.saver is not None:
                self.saver.wait()
        finally:
            stop.uninstall()
            self.metrics.close()
        return history


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
