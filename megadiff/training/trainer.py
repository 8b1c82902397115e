"""The training loop, written once for both engines: steps, non-finite policy, stop signals
and wall-clock budget, checkpoint cadence, metrics."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from megadiff import checkpoint_files as files
from megadiff.data.checks import UnreadableBatch
from megadiff.data.source import build_source
from megadiff.diffusion.objective import (
    MaskingObjective,
    noise_generator,
    summarize,
    weight_rows,
)
from megadiff.optim.recipe import report_lines
from megadiff.optim.schedule import build_scheduler
from megadiff.parallel.state import Ranks, device, init_distributed
from megadiff.plan import Plan
from megadiff.training.checkpoint import Checkpointer, Restored, check_compatible
from megadiff.training.engine import Engine
from megadiff.training.evaluation import Evaluator
from megadiff.training.faults import (
    EXIT_CONFIG,
    EXIT_NONFINITE,
    EXIT_OK,
    nonfinite_anywhere,
    stop_signals_blocked,
    take_stop_request,
)
from megadiff.training.metrics import open_run, run_summary, step_record


@dataclass
class Progress:
    """The run's counters (saved in checkpoints; the scheduler keeps its own, in tokens)."""

    step: int = 0
    tokens: int = 0
    nonfinite_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens": self.tokens, "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))


def stream_loss_weights(cfg: Any) -> torch.Tensor | None:
    """Each MDS stream's ``loss_weight`` by stream index, or None when all are 1."""
    weights = [s.loss_weight for s in cfg.data.streams] if cfg.data.source == "mds" else []
    if all(w == 1.0 for w in weights):
        return None
    return torch.tensor(weights, dtype=torch.float32)


def build_engine(plan: Plan, ranks: Ranks) -> Engine:
    if plan.cfg.train.engine == "deepspeed":
        from megadiff.training.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(plan, ranks)
    from megadiff.training.megatron_engine import MegatronEngine

    return MegatronEngine(plan, ranks)


class Trainer:
    """One run: an engine, its data source, objective, lr schedule, counters and checkpoints.

    With ``eval.every`` > 0, :meth:`fit` scores the held-out set (:mod:`~megadiff.training.
    evaluation`) at step 0, every ``eval.every`` steps and at the end, into ``metrics.jsonl``
    records beside the training records, with the same ``step`` and ``tokens``.
    """

    def __init__(self, plan: Plan) -> None:
        cfg = plan.cfg
        self.plan, self.cfg = plan, cfg
        self.ranks: Ranks = init_distributed(cfg)
        self.device = device()
        # checked before the model is built: a bad checkpoint.load fails fast
        start_from = files.resume_source(cfg)
        if start_from is not None:
            path, own = start_from
            check_compatible(path, cfg, optimizer=own or cfg.checkpoint.load_optimizer)
        self.engine = build_engine(plan, self.ranks)
        self.model, self.optimizer = self.engine.model, self.engine.optimizer
        self.scheduler = build_scheduler(plan, self.optimizer)
        with stop_signals_blocked():  # helper processes the data reader starts ignore them
            self.source = build_source(cfg, self.ranks.dp_rank, self.ranks.dp, self.device)
        self.objective = MaskingObjective.for_source(cfg.diffusion, self.source)
        self.stream_weights = stream_loss_weights(cfg)
        self.evaluator = Evaluator(self) if cfg.eval.every else None  # collective
        self.evaluated_at: int | None = None
        self.progress = Progress()
        self.exit_code = EXIT_OK
        self.checkpointer = Checkpointer(
            cfg,
            self.ranks,
            self.engine,
            shared={"scheduler": self.scheduler, "counters": self.progress},
            source=self.source,
            vocab=getattr(self.source, "vocab", None),
        )
        self.restored: Restored | None = None
        self.resumed = False  # True: this run's own checkpoint; False: checkpoint.load
        if start_from is not None:
            path, own = start_from
            self.resumed = own
            c = cfg.checkpoint
            self.restored = self.checkpointer.load(
                path, optimizer=own or c.load_optimizer, counters=own or not c.reset_step
            )
            if own:
                self.checkpointer.saved_step = self.step
        self.metrics = open_run(cfg, self.ranks.is_logger, self.step, self.resumed)

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def tokens(self) -> int:
        return self.progress.tokens

    @property
    def nonfinite_steps(self) -> int:
        return self.progress.nonfinite_steps

    # ------------------------------------------------------------------ one step

    def _microbatches(self) -> list[dict[str, Any]]:
        t = self.cfg.train
        return self.source.microbatches(
            self.step, t.global_batch, t.micro_batch, self.ranks.dp_rank, self.plan.n_micro
        )

    def _forward_microbatch(self, model: torch.nn.Module, batch: dict[str, Any]):
        """Mask one micro-batch with the noise keyed by (seed, step, DP rank, micro-batch), run
        ``model`` on it; returns the output and the loss function the engine calls on it."""
        gen = noise_generator(
            self.cfg.train.seed,
            self.step,
            self.ranks.dp_rank,
            batch["microbatch"],
            self.plan.n_micro,
        )
        noised = self.objective.corrupt(
            batch["tokens"], batch["modality"], gen, batch.get("prompt")
        )
        if self.stream_weights is not None:
            noised = weight_rows(noised, self.stream_weights[batch["source"].cpu()])
        mask = noised.attention_mask
        out = model(noised.inputs.to(self.device), None if mask is None else mask.to(self.device))
        return out, partial(self._loss, noised)

    def _loss(self, noised, output):
        loss, stats = self.objective.loss(output, noised)
        return loss, {"stats": stats}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        """Forward-only loss of the current step's batch and noise (no update).

        Returns the summarized stats on the last pipeline stage, None on other ranks.
        """
        self.engine.set_training(False)
        stats = self.engine.forward_backward(self._microbatches(), self._forward_microbatch, True)
        self.engine.set_training(True)
        return None if stats is None else summarize(stats.cpu())

    def train_step(self, on_grads: Callable[[Trainer], None] | None = None) -> dict[str, Any]:
        """One optimizer step. ``on_grads(trainer)`` runs after the gradients are reduced."""
        t0 = time.perf_counter()
        self.engine.set_training(True)
        self.engine.zero_grads()
        stats = self.engine.forward_backward(self._microbatches(), self._forward_microbatch, False)
        if on_grads is not None:
            on_grads(self)
        step_tokens = self.plan.tokens_per_step
        nonfinite = nonfinite_anywhere(stats, self.engine.local_grads())
        if nonfinite:
            # no update; with train.nonfinite=stop the step is not counted either
            self.engine.discard_update()
            if self.cfg.train.nonfinite == "stop":
                return {"step": self.step + 1, "nonfinite": True, "skipped": True}
            applied, grad_norm = False, float("nan")
            self.progress.nonfinite_steps += 1
        else:
            grad_norm, applied = self.engine.apply_update()
            self.scheduler.step(increment=step_tokens)
        self.progress.step += 1
        self.progress.tokens += step_tokens
        record = step_record(
            self.step,
            stats,
            self.tokens,
            self.optimizer.param_groups[0]["lr"],
            grad_norm,
            step_tokens,
            time.perf_counter() - t0,
            skipped=not applied,
        )
        if nonfinite:
            record.update(nonfinite=True, nonfinite_steps=self.nonfinite_steps)
        if self.cfg.data.source == "mds" and self.cfg.data.on_bad_sample == "skip":
            record["data_skipped"] = self.source.skipped_samples()
        return record

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path | None:
        """Collective: checkpoint the current step (once per step)."""
        return self.checkpointer.save(self.step, self.tokens)

    # ------------------------------------------------------------------ loop

    def _announce(self) -> None:
        p = self.plan
        self.metrics.info(
            f"megadiff: {self.engine.describe()}, {p.n_micro} micro-batch(es)/step, "
            f"{p.tokens_per_step:,} tokens/step, {self.engine.parameter_count():,} parameters, "
            f"run dir {self.cfg.run.dir}"
        )
        if p.recipe.logical is not None:
            for line in report_lines(p.recipe):
                self.metrics.info(line)
        r = self.restored
        if r is None:
            return
        if self.resumed:
            self.metrics.info(f"megadiff: resumed from {r.path} at step {self.step}")
        else:
            c = self.cfg.checkpoint
            what = "weights and optimizer state" if c.load_optimizer else "weights"
            start = "step 0 (checkpoint.reset_step)" if c.reset_step else f"its step {self.step}"
            self.metrics.info(f"megadiff: loaded {what} from {r.path}; training from {start}")

    def _already_complete(self) -> bool:
        """A resumed run already at (or past) ``train.steps``: say so (nothing is trained)."""
        if not self.resumed or self.step < self.cfg.train.steps:
            return False
        past = f" (train.steps={self.cfg.train.steps})" if self.step > self.cfg.train.steps else ""
        self.metrics.info(
            f"megadiff: already complete at step {self.step}{past} — raise train.steps to continue"
        )
        return True

    def fit(self) -> list[dict[str, Any]]:
        """Train to ``train.steps``, or until a stop signal, the time budget, a non-finite
        step with ``train.nonfinite=stop`` or ``train.max_nonfinite_streak`` skipped steps in a
        row; sets :attr:`exit_code` (0, 3, 75; 130 after SIGINT) and ends with the run summary.
        A resumed run already at ``train.steps`` says so and trains nothing."""
        cfg = self.cfg
        if self._already_complete():
            self.metrics.close()
            return []
        self._announce()
        t0, start_step = time.perf_counter(), self.step
        reason = f"reached train.steps={cfg.train.steps}"
        every = cfg.checkpoint.every
        stop = take_stop_request()
        stop.start_budget(cfg.train.exit_after_minutes)
        history: list[dict[str, Any]] = []
        streak = 0  # non-finite steps in a row
        try:
            if self.step < cfg.train.steps and stop.should_stop(budget=False):
                # a signal during start-up: keep what was loaded and stop before training
                files.log_rank0(f"stopping before step {self.step + 1}: {stop.reason}")
                self.exit_code, reason = stop.exit_code, stop.reason
            if self.exit_code == EXIT_OK and self.step == 0:
                self.run_eval()
            while self.exit_code == EXIT_OK and self.step < cfg.train.steps:
                try:
                    record = self.train_step()
                except UnreadableBatch as e:
                    self._report_unreadable(e)
                    self.exit_code = EXIT_CONFIG
                    reason = "data that cannot be read (the error above names it)"
                    break
                streak = streak + 1 if record.get("nonfinite") else 0
                if record.get("nonfinite"):
                    how = "skipped" if cfg.train.nonfinite == "skip" else "stopping"
                    files.log_rank0(
                        f"step {record['step']}: non-finite loss or gradients; {how} "
                        f"(train.nonfinite={cfg.train.nonfinite})"
                    )
                    if cfg.train.nonfinite == "stop":
                        self.exit_code = EXIT_NONFINITE
                        reason = "non-finite loss or gradients (train.nonfinite=stop)"
                        break
                self.metrics.log(record)
                history.append(record)
                if self._nonfinite_streak_too_long(streak):
                    self.exit_code = EXIT_NONFINITE
                    reason = f"{streak} non-finite steps in a row (train.max_nonfinite_streak)"
                    break
                self.checkpointer.poll()
                if stop.should_stop():
                    files.log_rank0(f"stopping at step {self.step}: {stop.reason}")
                    self.exit_code, reason = stop.exit_code, stop.reason
                    break
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.run_eval()
                if every and self.step % every == 0:
                    self.save_checkpoint()
            if history and self.step >= cfg.train.steps:
                self.run_eval()  # the end (once: not again when the last step was an eval step)
            if cfg.checkpoint.save_on_exit or self.exit_code != EXIT_OK:
                self.save_checkpoint()
            self.checkpointer.wait()
            self._summarize(start_step, time.perf_counter() - t0, reason)
        finally:
            stop.uninstall()
            self.metrics.close()
        return history

    def _report_unreadable(self, e: UnreadableBatch) -> None:
        """The rank that could not read names the sample; rank 0 says which rank it was."""
        if e.local is not None:
            print(f"megadiff train: error: {e.local}", file=sys.stderr, flush=True)
        if e.local is None or e.rank != self.ranks.rank:
            files.log_rank0(
                f"stopping before step {self.step + 1}: rank {e.rank} could not read its "
                f"batch: {e.message}"
            )

    def _summarize(self, start_step: int, seconds: float, reason: str) -> None:
        """The end-of-run summary on the logging rank."""
        saved = self.checkpointer.saved_step
        ckpt = None if saved is None else self.checkpointer.root / files.checkpoint_name(saved)
        lines = run_summary(
            start_step,
            self.step,
            self.tokens,
            seconds,
            reason,
            self.exit_code,
            ckpt,
            self.metrics.last_train,
            self.metrics.last_val,
        )
        for line in lines:
            self.metrics.info(line)

    def _nonfinite_streak_too_long(self, streak: int) -> bool:
        """``train.nonfinite=skip``: whether ``streak`` skipped steps in a row reach
        ``train.max_nonfinite_streak`` (0 = never); says so on the logging rank."""
        limit = self.cfg.train.max_nonfinite_streak
        if not limit or streak < limit:
            return False
        files.log_rank0(
            f"stopping at step {self.step}: {streak} non-finite steps in a row "
            f"(train.max_nonfinite_streak={limit}); the weights are the last good step's. Lower "
            "optim.lr, check the data, or set train.max_nonfinite_streak=0 to never stop"
        )
        return True

    def run_eval(self) -> dict[str, Any] | None:
        """Collective: score the held-out set at this step (once per step; nothing when
        ``eval.every`` is 0); the record goes to ``metrics.jsonl`` on the logging rank."""
        if self.evaluator is None or self.evaluated_at == self.step:
            return None
        self.evaluated_at = self.step
        values = self.evaluator.run()
        if values is None:
            return None
        record = {"step": self.step, "tokens": self.tokens, **values}
        self.metrics.log(record)
        return record

    def close(self) -> None:
        self.engine.close()
