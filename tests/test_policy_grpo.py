"""GRPO pieces of the policy trainer (hand-computed values) and a few dozen policy steps on a
synthetic environment whose best unmasking order is known."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megadiff.diffusion.sampling import SamplerConfig
from megadiff.policy.grpo import (
    clipped_objective,
    episode_reward,
    group_advantages,
    grpo_update,
    kl_estimate,
)
from megadiff.policy.network import PolicyConfig, UnmaskingPolicy
from megadiff.policy.rollout import collect
from megadiff.policy.sampler import PolicySampler


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is several times faster on a shared box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_rewards_multiplicative_and_additive():
    correct = torch.tensor([1.0, 1.0, 0.0, 1.0])
    nfe = torch.tensor([8, 16, 4, 32])
    got = episode_reward(correct, nfe, 32, 2.0, "multiplicative").tolist()
    assert got == pytest.approx([0.75**2, 0.5**2, 0.0, 0.0])
    got = episode_reward(correct, nfe, 32, 0.5, "additive").tolist()
    assert got == pytest.approx([1 - 0.125, 1 - 0.25, -0.0625, 0.5])
    assert episode_reward(correct, nfe, 32, 0.0, "multiplicative").tolist() == [1, 1, 0, 1]


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    assert group_advantages(r, 4).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    std = math.sqrt(1 / 3)  # sample std of (1, 0, 0, 1)
    got = group_advantages(r, 4, std_normalize=True).tolist()
    assert got[:4] == pytest.approx(
        [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1 + [-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)]
    )
    assert got[4:] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_clipped_objective_by_hand():
    # rollout 0: two steps (A = +1), rollout 1: one step (A = -2)
    old = torch.zeros(3, dtype=torch.float64)
    new = torch.log(torch.tensor([2.0, 0.8, 0.3], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -2.0], dtype=torch.float64)
    rollout = torch.tensor([0, 0, 1])
    obj = clipped_objective(new, old, adv, rollout, 2, 4, clip_eps=0.5)
    # step 1: min(2 * 1, 1.5 * 1) = 1.5 (clipped); step 2: min(0.8, 0.8) = 0.8;
    # step 3: min(0.3 * -2, 0.5 * -2) = -1.0 (clipped)
    want = (-(1.5 + 0.8) / 2 + 1.0) / 4
    assert obj.loss.item() == pytest.approx(want)
    assert (obj.clipped_steps, obj.steps) == (2, 3)
    obj.loss.backward()
    # only the unclipped step carries a gradient: d/dlogp (-0.8 / 2 / 4) = -0.8 / 8
    assert new.grad.tolist() == pytest.approx([0.0, -0.1, 0.0])
    assert kl_estimate(torch.tensor([0.0]), torch.tensor([0.0])).item() == 0.0
    assert kl_estimate(torch.tensor([0.0]), torch.tensor([-1.0])).item() == pytest.approx(
        math.exp(-1) + 1 - 1
    )


# ------------------------------------------------ a synthetic environment with a known order

V, MASK, PAD, N_GEN = 12, 11, 10, 6
RANGES = torch.tensor([[0, 10], [PAD, PAD + 1]])
TARGET = torch.tensor([(i + 3) % 10 for i in range(N_GEN)])


def chain_model(tokens: torch.Tensor) -> torch.Tensor:
    """A fake dLLM over ``[prompt, N_GEN masks]``: position i predicts its target token, with
    confidence 0.86, once position i - 1 is filled (position 0 always); before that a wrong token
    with confidence 0.23. Best policy: unmask exactly the confident positions, left to right."""
    B, L = tokens.shape
    logits = torch.zeros(B, L, V, dtype=torch.float64)
    logits[..., MASK] = logits[..., PAD] = -1e4
    for i in range(N_GEN):
        p = 1 + i
        ready = torch.ones(B, dtype=torch.bool) if i == 0 else tokens[:, p - 1] != MASK
        logits[ready, p, TARGET[i]] = 4.0
        logits[~ready, p, (TARGET[i] + 5) % 10] = 1.0
    return logits


def test_policy_steps_raise_the_reward_where_the_best_order_is_known():
    torch.manual_seed(0)
    policy = UnmaskingPolicy(PolicyConfig())
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.0)
    settings = SimpleNamespace(
        clip_eps=0.5, inner_iters=2, kl=0.0, grad_clip=1.0, tau=1.0, action="bernoulli"
    )
    sampler = PolicySampler(policy, mode="bernoulli")
    cfg = SamplerConfig("policy", steps=3 * N_GEN)
    groups, G = 4, 8
    tokens = torch.cat(
        [torch.zeros(groups * G, 1, dtype=torch.long), torch.full((groups * G, N_GEN), MASK)], 1
    )
    modality = torch.zeros_like(tokens)
    rewards = []
    for step in range(20):
        seeds = [1000 * step + i for i in range(groups * G)]
        ro = collect(chain_model, tokens, modality, RANGES, MASK, cfg, sampler, seeds)
        correct = (ro.output.tokens[:, 1:] == TARGET).double().mean(1)  # partial credit
        r = episode_reward(correct, ro.output.nfe, 3 * N_GEN, 0.0, "multiplicative")
        rewards.append(r.mean().item())
        adv = group_advantages(r, G)
        if bool((adv != 0).any()):
            grpo_update(policy, opt, ro.steps, adv, len(adv), settings)
    first, last = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert first < 0.75 and last > 0.9, rewards  # (0.65 -> 1.0 when measured)


@pytest.mark.parametrize("mode", ["bernoulli", "bernoulli-argmax", "dpls"])
def test_recorded_log_probs_match_the_training_forward(mode):
    """The log-likelihood recorded while acting equals the training forward's on the stacked
    steps (the first inner iteration's ratio is 1); argmax and DPLS actions are never empty."""
    from megadiff.policy.rollout import policy_log_probs

    torch.manual_seed(3)
    policy = UnmaskingPolicy(PolicyConfig(features=("confidence", "entropy")))
    for p in policy.parameters():
        torch.nn.init.normal_(p, std=0.3)
    sampler = PolicySampler(policy, mode=mode, tau=0.7)
    tokens = torch.cat([torch.zeros(5, 1, dtype=torch.long), torch.full((5, N_GEN), MASK)], 1)
    cfg = SamplerConfig("policy", steps=2 * N_GEN, block_length=4)
    ro = collect(chain_model, tokens, torch.zeros_like(tokens), RANGES, MASK, cfg, sampler,
                 list(range(5)))  # fmt: skip
    with torch.no_grad():
        lp, _ = policy_log_probs(policy, ro.steps, mode, 0.7)
    assert torch.allclose(lp.float(), ro.steps.old_log_prob, atol=1e-5)
    if mode != "bernoulli":
        assert bool(((ro.steps.rank >= 0).sum(1) >= 1).all())
    assert (ro.output.tokens != MASK).all()


def test_kl_term_pulls_the_policy_back_to_its_reference():
    """``policy.kl`` > 0: with no advantage to follow, the update only shrinks the per-step
    ``KL(pi || pi_ref)`` estimate on the rollouts' steps; with ``kl`` 0 it changes nothing."""
    from megadiff.policy.rollout import policy_log_probs

    torch.manual_seed(0)
    ref = UnmaskingPolicy(PolicyConfig()).requires_grad_(False)
    policy = UnmaskingPolicy(PolicyConfig())
    policy.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.2 * torch.randn_like(p))
    tokens = torch.cat([torch.zeros(8, 1, dtype=torch.long), torch.full((8, N_GEN), MASK)], 1)
    sampler = PolicySampler(policy, mode="bernoulli")
    cfg = SamplerConfig("policy", steps=3 * N_GEN)
    modality = torch.zeros_like(tokens)
    ro = collect(chain_model, tokens, modality, RANGES, MASK, cfg, sampler, range(8))

    def kl() -> float:
        with torch.no_grad():
            lp, _ = policy_log_probs(policy, ro.steps, "bernoulli", 1.0)
            ref_lp, _ = policy_log_probs(ref, ro.steps, "bernoulli", 1.0)
        return kl_estimate(lp, ref_lp).mean().item()

    settings = SimpleNamespace(
        clip_eps=0.5, inner_iters=2, kl=0.0, grad_clip=1.0, tau=1.0, action="bernoulli"
    )
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-4, weight_decay=0.0)
    zero = torch.zeros(8)
    before = [p.detach().clone() for p in policy.parameters()]
    grpo_update(policy, opt, ro.steps, zero, 8, settings, ref_policy=ref)
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    start = kl()
    settings.kl = 1.0
    for _ in range(10):
        grpo_update(policy, opt, ro.steps, zero, 8, settings, ref_policy=ref)
    assert start > 0 and kl() < 0.1 * start, (start, kl())  # (0.26 -> 0.002 when measured)
