"""``megadiff policy train``: GRPO for an unmasking policy over a frozen dLLM.

Each step: ``policy.prompts_per_step`` prompts (split over the data-parallel ranks), each run
``policy.group_size`` times by the sampler with the policy choosing what to unmask (the dLLM
greedy); rewards from the task's verifier and the NFE; advantages within each prompt's group;
``policy.inner_iters`` AdamW steps on the PPO-clipped objective, gradients summed over ranks
(gloo). The prompts and every rollout's seed depend only on ``policy.seed`` and the step, so a
resumed run repeats the uninterrupted one and any number of ranks sees the same episodes.

The run directory holds ``config.yaml``, ``metrics.jsonl`` and ``checkpoints/step_N/``
(``policy/`` = a policy folder, ``optimizer.pt``, ``state.json``; atomic, with a manifest).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megadiff.checkpoint_files import (
    CheckpointError,
    checkpoint_name,
    find_latest_valid,
    publish,
    start_tmp,
)
from megadiff.config import Config, ConfigError, PolicyTrainConfig, dump_config
from megadiff.diffusion.sampling import SamplerConfig
from megadiff.generation.tasks import TaskError, batch_requests, build_request, decode
from megadiff.policy.grpo import episode_reward, group_advantages, grpo_update
from megadiff.policy.network import (
    PolicyConfig,
    PolicyError,
    UnmaskingPolicy,
    load_policy,
    save_policy,
)
from megadiff.policy.rollout import collect, policy_log_probs
from megadiff.policy.sampler import PolicySampler
from megadiff.policy.tasks import PolicyTask, PolicyTaskError, load_task

BETAS = (0.9, 0.99)
ERRORS = (ConfigError, CheckpointError, PolicyError, PolicyTaskError, TaskError)


@dataclass
class World:
    rank: int
    size: int

    @property
    def is_logger(self) -> bool:
        return self.rank == 0


def check_settings(cfg: Config, world: int) -> PolicyTrainConfig:
    """The ``policy`` section's values the command needs (:class:`ConfigError`)."""
    p = cfg.policy
    if not p.ckpt:
        raise ConfigError("config key 'policy.ckpt': set the frozen dLLM's checkpoint or run")
    if not p.task:
        raise ConfigError("config key 'policy.task': set a task name or module:function")
    if p.prompts_per_step % world:
        raise ConfigError(
            f"config key 'policy.prompts_per_step': {p.prompts_per_step} prompts do not split "
            f"over {world} ranks; use a multiple of {world}"
        )
    return p


def load_prompt_source(p: PolicyTrainConfig, task: PolicyTask):
    """``prompts_for(step) -> list[str]`` of ``policy.prompts_per_step`` prompts."""
    n = p.prompts_per_step
    if p.prompts is None:
        return lambda step: task.prompts("train", n, p.seed * 1_000_003 + step)
    from megadiff.generation.api import read_prompts

    pool = read_prompts(p.prompts)
    if not pool:
        raise PolicyTaskError(f"policy.prompts file '{p.prompts}' holds no prompts")

    def prompts_for(step: int) -> list[str]:  # epoch-wise shuffles, fixed by the seed
        out = []
        for i in range((step - 1) * n, step * n):
            epoch, j = divmod(i, len(pool))
            order = list(range(len(pool)))
            random.Random(f"{p.seed}/{epoch}").shuffle(order)
            out.append(pool[order[j]])
        return out

    return prompts_for


def check_expressible(prompts: list[str], bundle, p: PolicyTrainConfig, task_name: str) -> None:
    """Each prompt survives the checkpoint's text tokenizer and fits its context with the
    generation buffer (:class:`PolicyTaskError` naming the prompt)."""
    tok, v = bundle.tokenizers["text"], bundle.vocab
    context = bundle.cfg.model.seq_length if bundle.cfg is not None else 1 << 30
    for prompt in prompts:
        try:
            ids = tok.encode(prompt)
            back = tok.decode(ids)
        except Exception as e:
            raise PolicyTaskError(
                f"task '{task_name}': prompt {prompt[:40]!r} cannot be tokenized by the "
                f"checkpoint's text tokenizer ({e})"
            ) from e
        if back != prompt or any(i >= v.text_size for i in ids):
            raise PolicyTaskError(
                f"task '{task_name}': prompt {prompt[:40]!r} cannot be expressed in the "
                f"checkpoint's text vocabulary ({v.text_size} ids); train the dLLM on this "
                "task's text or choose another task"
            )
        try:
            build_request("text", prompt, v, bundle.tokenizers, context, p.gen_length)
        except TaskError as e:
            raise PolicyTaskError(f"task '{task_name}': {e}") from e


def rollout_seeds(p: PolicyTrainConfig, step: int, first: int, count: int) -> list[int]:
    """Seeds of the global rollouts ``first .. first + count - 1`` of ``step``."""
    base = (p.seed * 1_000_003 + step) * 1_048_576
    return [base + i for i in range(first, first + count)]


class PolicyTrainer:
    """The loop of ``megadiff policy train`` on one rank."""

    def __init__(self, cfg: Config, world: World, bundle, task: PolicyTask, prompts_for) -> None:
        self.cfg, self.p, self.world = cfg, cfg.policy, world
        self.bundle, self.task, self.prompts_for = bundle, task, prompts_for
        p = self.p
        torch.manual_seed(p.seed)
        self.net_config = PolicyConfig(features=tuple(p.features))
        self.policy = UnmaskingPolicy(self.net_config)
        self.ref = None
        if p.kl > 0:
            self.ref = UnmaskingPolicy(self.net_config)
            self.ref.load_state_dict(self.policy.state_dict())
            self.ref.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=p.lr, betas=BETAS, weight_decay=p.weight_decay
        )
        self.step = 0
        self.root = Path(cfg.checkpoint.dir or Path(cfg.run.dir) / "checkpoints")
        self.sampler_cfg = SamplerConfig(
            "policy", steps=p.sampler_steps, block_length=p.block_length, cfg_scale=p.cfg_scale
        ).validate()
        self.budget = (p.sampler_steps or p.gen_length) * (2 if p.cfg_scale > 0 else 1)

    # ------------------------------------------------------------------ checkpoints

    def resume(self) -> Path | None:
        """Collective: continue from this run's newest valid checkpoint, if any."""
        if not self.cfg.checkpoint.resume:
            return None
        latest = find_latest_valid(self.root, self.cfg.checkpoint.checksums, set_aside_bad=True)
        if latest is None:
            return None
        saved = load_policy(latest / "policy", expect=self.net_config)
        self.policy.load_state_dict(saved.state_dict())
        self.optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
        if self.ref is not None:
            self.ref.load_state_dict(load_policy(latest / "reference").state_dict())
        self.step = int(json.loads((latest / "state.json").read_text())["step"])
        return latest

    def save(self) -> Path:
        """Collective: an atomic checkpoint of the policy, optimizer and step."""
        tmp, final = start_tmp(self.root, self.step)
        if self.world.is_logger:
            save_policy(self.policy, tmp / "policy")
            if self.ref is not None:
                save_policy(self.ref, tmp / "reference")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": self.step}) + "\n")
        publish(tmp, final, self.step, self.cfg.checkpoint.keep)
        return final

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict[str, Any]:
        """Rollouts of this rank's prompts, the GRPO update, the step's (global) metrics."""
        p, w = self.p, self.world
        t0 = time.perf_counter()
        step = self.step + 1
        prompts = self.prompts_for(step)
        per_rank = len(prompts) // w.size
        mine = prompts[w.rank * per_rank : (w.rank + 1) * per_rank]
        expanded = [q for q in mine for _ in range(p.group_size)]
        first = w.rank * per_rank * p.group_size
        seeds = rollout_seeds(p, step, first, len(expanded))
        b, v = self.bundle, self.bundle.vocab
        from megadiff.generation.tasks import sampling_ranges

        context = b.cfg.model.seq_length if b.cfg is not None else 1 << 30
        reqs = [build_request("text", q, v, b.tokenizers, context, p.gen_length) for q in expanded]
        tok, mod, cond = batch_requests(reqs, v.pad_id)
        sampler = PolicySampler(self.policy, mode=p.action, tau=p.tau)
        ro = collect(b.logits_fn, tok, mod, sampling_ranges(v), v.mask_id, self.sampler_cfg,
                     sampler, seeds, cond)  # fmt: skip
        texts = [decode(r, ro.output.tokens[i].numpy(), v, b.tokenizers)["text"]
                 for i, r in enumerate(reqs)]  # fmt: skip
        scores = [self.task.reward(q, t) for q, t in zip(expanded, texts)]
        correct = torch.tensor(scores, dtype=torch.float64)
        reward = episode_reward(correct, ro.output.nfe, self.budget, p.alpha, p.reward)
        adv = group_advantages(reward, p.group_size, p.std_normalize)
        any_adv = torch.tensor([float((adv != 0).any())])
        self._all_reduce(any_adv, dist.ReduceOp.MAX)
        total = p.prompts_per_step * p.group_size
        with torch.no_grad():
            _, ent = policy_log_probs(self.policy, ro.steps, p.action, p.tau)
        entropy = ent.mean().item() if len(ent) else 0.0
        loss = clip = 0.0
        grad_norm = None
        if any_adv.item() > 0:
            stats = grpo_update(self.policy, self.optimizer, ro.steps, adv, total, p,
                                self._reduce_grads, self.ref)  # fmt: skip
            loss, clip, grad_norm = stats.loss, stats.clip_fraction, stats.grad_norm
        self.step = step
        sums = torch.tensor(
            [reward.sum(), correct.sum(), ro.output.nfe.sum(), ro.still_masked().sum(),
             len(reward), loss, clip, entropy], dtype=torch.float64,
        )  # fmt: skip
        self._all_reduce(sums, dist.ReduceOp.SUM)
        n = sums[4].item()
        return {
            "step": step,
            "reward": sums[0].item() / n,
            "accuracy": sums[1].item() / n,
            "nfe": sums[2].item() / n,
            "still_masked": sums[3].item() / n,
            "loss": sums[5].item(),
            "clip_fraction": sums[6].item() / w.size,
            "entropy": sums[7].item() / w.size,
            "grad_norm": grad_norm,
            "updated": any_adv.item() > 0,
            "step_time": time.perf_counter() - t0,
        }

    def _all_reduce(self, t: torch.Tensor, op) -> None:
        if self.world.size > 1:
            dist.all_reduce(t, op=op)

    def _reduce_grads(self, params: list[torch.Tensor]) -> None:
        if self.world.size == 1:
            return
        flat = torch.cat([q.grad.reshape(-1) for q in params])
        dist.all_reduce(flat)
        i = 0
        for q in params:
            q.grad.copy_(flat[i : i + q.numel()].view_as(q.grad))
            i += q.numel()


def progress_line(r: dict[str, Any], total: int) -> str:
    return (
        f"policy step {r['step']}/{total} | reward {r['reward']:.3f} | acc {r['accuracy']:.3f} "
        f"| NFE {r['nfe']:.1f} | still masked {r['still_masked']:.2f} | clip "
        f"{r['clip_fraction']:.3f} | entropy {r['entropy']:.3f} | {r['step_time']:.1f} s/step"
    )


def init_group(launch) -> World:
    """The gloo process group of a torchrun launch (none for one process)."""
    if launch.world_size > 1 and not dist.is_initialized():
        from megadiff.parallel.state import TIMEOUT, launch_store

        store = dist.PrefixStore("policy_pg", launch_store(launch))
        dist.init_process_group(
            "gloo", store=store, rank=launch.rank, world_size=launch.world_size, timeout=TIMEOUT
        )
    return World(launch.rank, launch.world_size)


def train_policy(cfg: Config, launch) -> int:
    """Load, check, train; returns the exit code (0, or 75 after a stop signal)."""
    from megadiff.generation.load import load_for_generation
    from megadiff.training.faults import take_stop_request
    from megadiff.training.metrics import MetricsLogger, truncate_metrics

    stop = take_stop_request()
    p = check_settings(cfg, launch.world_size)
    bundle = load_for_generation(p.ckpt)
    bundle.require("text")
    task = load_task(p.task, bundle.tokenizers["text"])
    prompts_for = load_prompt_source(p, task)
    check_expressible(prompts_for(1), bundle, p, p.task)
    world = init_group(launch)
    trainer = PolicyTrainer(cfg, world, bundle, task, prompts_for)
    resumed = trainer.resume()
    run_dir = Path(cfg.run.dir)
    if world.is_logger:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        truncate_metrics(run_dir / "metrics.jsonl", trainer.step)
    log = MetricsLogger(run_dir, p.steps, world.is_logger, cfg.logging.every, False)
    if resumed is not None:
        log.info(f"megadiff policy train: resumed from {resumed} (step {trainer.step})")
    code = 0
    try:
        while trainer.step < p.steps:
            record = trainer.train_step()
            log.write(record)
            if cfg.logging.progress and (record["step"] % cfg.logging.every == 0
                                         or record["step"] == p.steps):  # fmt: skip
                log.info(progress_line(record, p.steps))
            every = cfg.checkpoint.every
            if stop.should_stop(budget=False):
                trainer.save()
                log.info(f"megadiff policy train: {stop.reason}; saved step {trainer.step}")
                code = stop.exit_code
                break
            if every and trainer.step % every == 0 and trainer.step < p.steps:
                trainer.save()
        else:
            if not (trainer.root / checkpoint_name(trainer.step)).is_dir():
                trainer.save()
            log.info(f"megadiff policy train: done, policy at {trainer.root} (step {p.steps})")
    finally:
        log.close()
        stop.uninstall()
    return code


def run(cfg: Config, launch) -> int:
    """The command's body with its named errors (exit 2)."""
    from megadiff.training.run_lock import RunDirLocked, hold_run_dirs

    try:
        with hold_run_dirs(cfg, launch):
            return train_policy(cfg, launch)
    except (*ERRORS, RunDirLocked) as e:
        print(f"megadiff policy train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
