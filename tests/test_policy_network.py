"""The unmasking policy network, its folder format and its actions (hand-computed values)."""

import json
import math

import pytest
import torch

from megadiff.policy import actions as A
from megadiff.policy.network import (
    PolicyConfig,
    PolicyError,
    UnmaskingPolicy,
    load_policy,
    save_policy,
)


def test_parameter_count_matches_hand_derivation():
    # time-MLP 33,024 + confidence proj 256 + mask embedding 256 + block 297,344
    # + final LayerNorm 256 + head 129
    n = sum(p.numel() for p in UnmaskingPolicy().parameters())
    assert n == 33_024 + 256 + 256 + 297_344 + 256 + 129 == 331_265


def test_initial_unmask_probability_is_sigmoid_minus_two():
    torch.manual_seed(0)
    pol = UnmaskingPolicy()
    feats = torch.rand(3, 10, 1)
    masked = torch.rand(3, 10) < 0.5
    p = torch.sigmoid(pol(feats, masked, torch.tensor([0.0, 0.3, 0.9])))
    assert p.shape == (3, 10)
    assert torch.allclose(p, torch.full_like(p, 1 / (1 + math.exp(2))), atol=1e-6)  # 0.1192


def test_padding_does_not_change_real_positions():
    torch.manual_seed(0)
    pol = UnmaskingPolicy(PolicyConfig(features=("confidence", "margin", "entropy", "topk")))
    for p in pol.parameters():  # leave the zero init so that every input matters
        torch.nn.init.normal_(p, std=0.2)
    feats, masked = torch.rand(1, 6, 7), torch.rand(1, 6) < 0.5
    t = torch.tensor([0.25])
    alone = pol(feats, masked, t)
    padded_feats = torch.cat([feats, torch.rand(1, 3, 7)], 1)
    padded_mask = torch.cat([masked, torch.ones(1, 3, dtype=torch.bool)], 1)
    pad = torch.tensor([[False] * 6 + [True] * 3])
    with_pad = pol(padded_feats, padded_mask, t, pad)
    assert torch.allclose(with_pad[:, :6], alone, atol=1e-6)
    assert not torch.allclose(pol(padded_feats, padded_mask, t)[:, :6], alone, atol=1e-4)


def test_save_load_roundtrip_and_named_errors(tmp_path):
    torch.manual_seed(1)
    pol = UnmaskingPolicy()
    torch.nn.init.normal_(pol.head.weight)
    save_policy(pol, tmp_path / "p")
    assert sorted(f.name for f in (tmp_path / "p").iterdir()) == [
        "model.safetensors",
        "policy.json",
    ]
    back = load_policy(tmp_path / "p")
    x, m, t = torch.rand(2, 5, 1), torch.ones(2, 5, dtype=torch.bool), torch.tensor([0.1, 0.5])
    assert torch.equal(back(x, m, t), pol(x, m, t))
    # a run directory: its latest checkpoint's policy
    save_policy(pol, tmp_path / "run" / "checkpoints" / "step_3" / "policy")
    assert load_policy(tmp_path / "run").config == pol.config
    with pytest.raises(PolicyError, match="another shape or feature set.*features"):
        load_policy(tmp_path / "p", expect=PolicyConfig(features=("confidence", "margin")))
    # policy.json says one feature set, the weights are of another
    meta = json.loads((tmp_path / "p" / "policy.json").read_text())
    meta["config"]["features"] = ["confidence", "entropy"]
    (tmp_path / "p" / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(PolicyError, match="does not match policy.json"):
        load_policy(tmp_path / "p")
    meta["config"]["features"] = ["nope"]
    (tmp_path / "p" / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(PolicyError, match="features"):
        load_policy(tmp_path / "p")
    with pytest.raises(PolicyError, match="no policy.json"):
        load_policy(tmp_path / "nothing")


def test_bernoulli_log_prob_and_entropy_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0), -1.0, 5.0]])  # p = 1/2, 3/4, sigmoid(-1), -
    cand = torch.tensor([[True, True, True, False]])
    rank = torch.tensor([[0, -1, 0, 0]])  # chosen: 0 and 2 (3 is no candidate)
    s2 = 1 / (1 + math.e)
    want = math.log(0.5) + math.log(0.25) + math.log(s2)
    got = A.bernoulli_log_prob(logits, rank, cand, tau=1.0)
    assert got.item() == pytest.approx(want, abs=1e-6)
    # tau = 2 halves the logits: p = sigmoid(log 3 / 2) = sqrt(3) / (1 + sqrt(3))
    q = math.sqrt(3) / (1 + math.sqrt(3))
    s2h = 1 / (1 + math.exp(0.5))
    want2 = math.log(0.5) + math.log(1 - q) + math.log(s2h)
    assert A.bernoulli_log_prob(logits, rank, cand, 2.0).item() == pytest.approx(want2, abs=1e-6)
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
    ent = A.bernoulli_entropy(logits, cand, 1.0).item()
    assert ent == pytest.approx((h(0.5) + h(0.75) + h(s2)) / 3, abs=1e-6)


def test_bernoulli_sampling_and_empty_action_fallback():
    logits = torch.tensor([[-1.0, 2.0, 0.5, 9.0], [-3.0, -2.0, 1.0, 0.0]])
    cand = torch.tensor([[True, True, True, False], [True, True, False, True]])
    # sigmoid: row 0 -> 0.269, 0.881, 0.622; row 1 -> 0.047, 0.119, -, 0.5
    u = torch.tensor([[0.2, 0.9, 0.5, 0.0], [0.9, 0.9, 0.0, 0.6]], dtype=torch.float64)
    rank = A.sample_bernoulli(logits, cand, 1.0, u)
    assert rank.tolist() == [[0, -1, 0, -1], [-1, -1, -1, -1]]
    fixed = A.argmax_fallback(rank, logits, cand)
    # row 1 was empty: its largest-logit candidate is position 3 (logit 0; position 2 is no
    # candidate although its logit is larger); row 0 keeps its action
    assert fixed.tolist() == [[0, -1, 0, -1], [-1, -1, -1, 0]]


def test_sample_action_uses_each_rows_generator():
    logits = torch.zeros(3, 8)
    cand = torch.ones(3, 8, dtype=torch.bool)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    both = A.sample_action("bernoulli", logits, cand, 1.0, gens)
    one = [torch.Generator().manual_seed(6)]
    alone = A.sample_action("bernoulli", logits[1:2], cand[1:2], 1.0, one)
    assert torch.equal(both[1:2], alone)


def test_dpls_log_prob_by_hand():
    logits = torch.tensor([[1.0, 0.0, 2.0, 0.5]])
    cand = torch.tensor([[True, True, True, False]])
    rank = torch.tensor([[1, -1, 0, -1]])  # first 2, then 0, then STOP (logit 0)
    e = math.exp
    first = e(2) / (e(1) + e(0) + e(2))
    second = e(1) / (e(1) + e(0) + e(0))  # candidates 0, 1 and STOP
    stop = e(0) / (e(0) + e(0))  # candidate 1 and STOP
    got = A.dpls_log_prob(logits, rank, cand, 1.0, 0.0).item()
    assert got == pytest.approx(math.log(first * second * stop), abs=1e-6)
    only_first = torch.tensor([[-1, -1, 0, -1]])
    want = math.log(first * e(0) / (e(1) + e(0) + e(0)))
    got = A.dpls_log_prob(logits, only_first, cand, 1.0, 0.0).item()
    assert got == pytest.approx(want, abs=1e-6)


def test_dpls_sampling_is_never_empty_and_matches_its_log_prob_frequencies():
    torch.manual_seed(0)
    logits = torch.tensor([[0.5, -0.5, 1.0]]).repeat(20000, 1)
    cand = torch.ones_like(logits, dtype=torch.bool)
    u = torch.rand(2, 20000, 4, dtype=torch.float64)
    rank = A.sample_dpls(logits, cand, 1.0, -0.5, u)
    assert ((rank >= 0).sum(1) >= 1).all() and (rank == 0).sum(1).eq(1).all()
    # the frequency of the action "2 first, then STOP" against its likelihood
    target = torch.tensor([-1, -1, 0])
    freq = (rank == target).all(1).double().mean().item()
    p = A.dpls_log_prob(logits[:1], target[None], cand[:1], 1.0, -0.5).exp().item()
    assert freq == pytest.approx(p, abs=0.01)
