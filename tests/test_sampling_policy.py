"""Strategy ``policy`` in the sampler: what the policy observes (the whole generation buffer)
and what is committed (its action on the current block), against hand-built expectations."""

from __future__ import annotations

import torch

from megadiff.diffusion.sampling import SamplerConfig, sample
from tests.test_sampling import MASK, PAD, RANGES, FakeModel, _mixed_buffer


class Recorder:
    """Commits the leftmost candidate; records every observation."""

    features = ("confidence", "entropy")

    def __init__(self) -> None:
        self.seen = []

    def __call__(self, obs):
        self.seen.append(obs)
        first = obs.candidate.long().argmax(1)
        out = torch.zeros_like(obs.candidate)
        has = obs.candidate.any(1)
        out[has, first[has]] = True
        return out


def test_policy_sees_every_generated_position_and_commits_in_its_block():
    x, mod = _mixed_buffer(1)
    masked_pos = (x[0] == MASK).nonzero(as_tuple=True)[0]
    G = len(masked_pos)
    rec = Recorder()
    c = SamplerConfig("policy", block_length=4)
    out = sample(FakeModel(3), x, mod, RANGES, MASK, c, policy=rec)
    assert out.nfe.item() == G == len(rec.seen)  # one position per step
    # the leftmost position first: the buffer fills left to right
    for t, obs in enumerate(rec.seen):
        assert obs.features.shape == (1, G, 2)
        assert obs.masked.tolist() == [[i >= t for i in range(G)]]
        block = t // 4
        want = [t <= i < 4 * (block + 1) for i in range(G)]
        assert obs.candidate.tolist() == [want]
        assert obs.step_frac.item() == t / G
        assert not obs.pad.any()
    # features are the dLLM's at every generated position (unmasked ones too): recompute step 5
    model = FakeModel(3)
    buf = x.clone()
    buf[0, masked_pos[:5]] = out.tokens[0, masked_pos[:5]]
    logits = model(buf)[0, masked_pos]
    for i, p in enumerate(masked_pos.tolist()):
        lo, hi = RANGES[mod[0, p]].tolist()
        prob = logits[i, lo:hi].softmax(-1)
        feat = rec.seen[5].features[0, i]
        assert abs(feat[0].item() - prob.max().item()) < 1e-5
        ent = -(prob * prob.log()).sum().item()
        assert abs(feat[1].item() - ent) < 1e-4


def test_policy_batched_with_cfg_equals_one_by_one():
    lens, gen = [3, 6], [7, 10]
    rows = [torch.cat([torch.arange(n) % 20, torch.full((g,), MASK)]) for n, g in zip(lens, gen)]
    L = max(len(r) for r in rows)
    xb = torch.full((2, L), PAD)
    mb = torch.full((2, L), 3)
    for i, r in enumerate(rows):
        xb[i, : len(r)] = r
        mb[i, : len(r)] = 0

    def policy(obs):  # depends on the whole buffer: mean confidence of the masked positions
        conf = obs.features[..., 0]
        mean = (conf * obs.masked).sum(1, keepdim=True) / obs.masked.sum(1, keepdim=True)
        return conf > mean

    c = SamplerConfig("policy", cfg_scale=1.0, block_length=5)
    cond = (xb != MASK) & (xb != PAD)
    both = sample(FakeModel(2), xb, mb, RANGES, MASK, c, cond=cond, policy=policy)
    for i, r in enumerate(rows):
        one = sample(FakeModel(2), r[None], mb[i : i + 1, : len(r)], RANGES, MASK, c, policy=policy)
        assert torch.equal(both.tokens[i, : len(r)], one.tokens[0])
        assert both.nfe[i] == one.nfe[0] == 2 * one.steps[0]  # CFG: two forwards per step
    assert (both.tokens != MASK).all()
