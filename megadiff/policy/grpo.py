"""GRPO for the unmasking policy: rewards, group advantages and the PPO-clipped objective.

A GRPO "token" is one sampler step: its ratio is that of the whole step action's likelihood,
``exp(log pi(u_t) - log pi_old(u_t))``. Each rollout's objective averages its steps; the loss is
the mean over rollouts (over all data-parallel ranks: each rank sums its own and divides by the
global count, then gradients are summed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

REWARD_FORMS = ("multiplicative", "additive")


def episode_reward(correct: Tensor, nfe: Tensor, budget: int, alpha: float, form: str) -> Tensor:
    """``correct * (1 - NFE/T)^alpha`` (multiplicative) or ``correct - alpha NFE/T`` (additive:
    it rewards fast wrong rollouts over slow ones and collapses to one-step decoding)."""
    frac = (nfe.double() / budget).clamp(0.0, 1.0)
    if form == "multiplicative":
        return correct.double() * (1.0 - frac) ** alpha
    if form == "additive":
        return correct.double() - alpha * frac
    raise ValueError(f"unknown reward form '{form}' (known: {', '.join(REWARD_FORMS)})")


def group_advantages(rewards: Tensor, group_size: int, std_normalize: bool = False) -> Tensor:
    """``reward - mean of its group`` (consecutive groups of ``group_size``); optionally divided
    by the group's standard deviation (+ 1e-4)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.double().view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if std_normalize:
        adv = adv / (r.std(1, keepdim=True) + 1e-4)
    return adv.view(-1)


@dataclass
class Objective:
    loss: Tensor  # this rank's share of the loss (sum of its rollouts' / the global count)
    clipped_steps: int  # steps whose ratio was clipped in the objective's min
    steps: int


def clipped_objective(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantage: Tensor,
    rollout: Tensor,
    n_rollouts: int,
    total_rollouts: int,
    clip_eps: float,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Objective:
    """PPO-clipped GRPO loss. Per step ``s`` (``[S]`` each): ``log_prob`` (with grad),
    ``old_log_prob``, ``advantage`` (its rollout's), ``rollout`` (index in ``0..n_rollouts-1``).
    Each rollout's term is the mean over its steps of ``-min(rho A, clip(rho, 1 +- eps) A)``
    (``+ kl_coef * kl`` per step); the result sums them and divides by ``total_rollouts``."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = ratio * advantage
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantage
    per_step = -torch.minimum(unclipped, clipped)
    if kl is not None and kl_coef > 0:
        per_step = per_step + kl_coef * kl
    steps = torch.zeros(n_rollouts, dtype=per_step.dtype).index_add_(
        0, rollout, torch.ones_like(per_step)
    )
    sums = torch.zeros(n_rollouts, dtype=per_step.dtype).index_add(0, rollout, per_step)
    per_rollout = sums / steps.clamp(min=1)
    loss = per_rollout.sum() / total_rollouts
    n_clipped = int((clipped < unclipped).sum())  # the min took the clipped term
    return Objective(loss, n_clipped, int(per_step.numel()))


def kl_estimate(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
    """Per-step ``KL(pi || pi_ref)`` estimate ``exp(r) - r - 1``, ``r = ref - log_prob`` (>= 0)."""
    r = ref_log_prob - log_prob
    return torch.exp(r) - r - 1.0


@dataclass
class UpdateStats:
    loss: float  # the last inner iteration's loss (this rank's share)
    clip_fraction: float  # clipped steps / steps, over the inner iterations (this rank)
    grad_norm: float | None  # before clipping, last iteration (None: no update)
    updated: bool


def grpo_update(
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    steps,
    advantages: Tensor,
    total_rollouts: int,
    settings,
    reduce_grads=None,
    ref_policy: torch.nn.Module | None = None,
) -> UpdateStats:
    """``settings.inner_iters`` optimizer steps on one batch of rollouts (``steps``: their
    :class:`~megadiff.policy.rollout.Steps`; ``advantages`` ``[n]`` per local rollout).
    ``settings``: clip_eps, inner_iters, kl, grad_clip, tau, action (the policy config
    section). ``reduce_grads(params)``: sums the gradients over data-parallel ranks. The caller
    skips this when every advantage (on every rank) is zero."""
    from megadiff.policy.rollout import policy_log_probs

    params = [p for p in policy.parameters() if p.requires_grad]
    n_local = len(advantages)
    adv_step = advantages[steps.rollout]
    ref_lp = None
    if ref_policy is not None and settings.kl > 0:
        with torch.no_grad():
            ref_lp, _ = policy_log_probs(ref_policy, steps, settings.action, settings.tau)
    clipped = total = 0
    loss_value, grad_norm = 0.0, None
    for _ in range(settings.inner_iters):
        optimizer.zero_grad(set_to_none=False)
        lp, _ = policy_log_probs(policy, steps, settings.action, settings.tau)
        kl = kl_estimate(lp, ref_lp) if ref_lp is not None else None
        obj = clipped_objective(
            lp, steps.old_log_prob.double(), adv_step, steps.rollout, n_local, total_rollouts,
            settings.clip_eps, kl, settings.kl,
        )  # fmt: skip
        obj.loss.backward()
        obj.loss = obj.loss.detach()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if reduce_grads is not None:
            reduce_grads(params)
        norm = torch.nn.utils.clip_grad_norm_(
            params, settings.grad_clip if settings.grad_clip > 0 else float("inf")
        )
        optimizer.step()
        clipped += obj.clipped_steps
        total += obj.steps
        loss_value, grad_norm = obj.loss.item(), float(norm)
    return UpdateStats(loss_value, clipped / max(total, 1), grad_norm, True)
