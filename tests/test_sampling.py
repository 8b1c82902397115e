"""The sampler engine against LLaDA's published loop, and its invariants (fake logits, no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megadiff.diffusion.sampling import SamplerConfig, SamplingError, sample
from megadiff.diffusion.strategies import STRATEGIES, StepScores, select

V = 40
MASK = V - 1  # outside every modality range below
PAD = V - 2
RANGES = torch.tensor([[0, 20], [20, 30], [30, 38], [PAD, PAD + 1]])  # text, image, audio, pad


class FakeModel:
    """Deterministic, row-independent logits that depend on the whole buffer (bidirectional).

    PAD tokens are ignored, so a row's logits do not depend on how far it was padded.
    """

    def __init__(self, seed: int = 0, d: int = 8) -> None:
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(V, d, generator=g, dtype=torch.float64)
        self.pos = torch.randn(64, d, generator=g, dtype=torch.float64)
        self.out = torch.randn(d, V, generator=g, dtype=torch.float64) * 3
        self.calls: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.clone())
        keep = (x != PAD).double()[..., None]
        h = self.emb[x] * keep
        ctx = h.sum(1, keepdim=True) / keep.sum(1, keepdim=True)
        logits = torch.tanh(h + ctx + self.pos[: x.shape[1]]) @ self.out
        logits[..., MASK] = -1e4  # like a trained model: never predicts MASK (finite, so that
        logits[..., PAD] = -1e4  # CFG's difference of logits stays a number)
        return logits


# ---------------------------------------------------------------- LLaDA's reference loop
# Re-implemented from LLaDA's generate.py (low_confidence remasking, greedy), independent of
# megadiff: get_num_transfer_tokens + block-wise loop + CFG with prompt positions masked.


def llada_num_transfer(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base, rem = mask_num // steps, mask_num % steps
    out = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        out[i, : rem[i]] += 1
    return out


def llada_generate(model, prompt, steps, gen_length, block_length, cfg_scale=0.0):
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), MASK, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    prompt_index = x != MASK
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    P = prompt.shape[1]
    for nb in range(num_blocks):
        block_mask = x[:, P + nb * block_length : P + (nb + 1) * block_length] == MASK
        ntt = llada_num_transfer(block_mask, steps)
        for i in range(steps):
            mask_index = x == MASK
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = MASK
                logits, un_logits = torch.chunk(model(torch.cat([x, un_x])), 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x)
            x0 = torch.argmax(logits, dim=-1)  # temperature 0
            p = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            x0_p[:, P + (nb + 1) * block_length :] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-np.inf, dtype=x0_p.dtype))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, sel = torch.topk(confidence[j], k=int(ntt[j, i]))
                transfer[j, sel] = True
            x[transfer] = x0[transfer]
    return x


@pytest.mark.parametrize(
    "gen,block,steps,cfg",
    [(16, 16, 16, 0.0), (16, 4, 8, 0.0), (16, 8, 4, 0.0), (12, 12, 5, 0.0), (16, 8, 8, 1.5)],
)
def test_confidence_matches_llada(gen, block, steps, cfg):
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 20, (3, 5), generator=g)
    ref = llada_generate(FakeModel(), prompt, steps, gen, block, cfg)
    x = torch.cat([prompt, torch.full((3, gen), MASK)], 1)
    text = torch.zeros_like(x)
    ranges = torch.tensor([[0, V - 2]] * 4)  # the whole real vocabulary: restriction is a no-op
    c = SamplerConfig("confidence", steps=steps, block_length=block, cfg_scale=cfg)
    out = sample(FakeModel(), x, text, ranges, MASK, c)
    assert torch.equal(out.tokens, ref)
    per_block = steps // (gen // block)
    expect_nfe = (gen // block) * min(per_block, block) * (2 if cfg > 0 else 1)
    assert out.nfe.tolist() == [expect_nfe] * 3


def test_llada_schedule():
    from megadiff.diffusion.strategies import get_num_transfer_tokens

    counts = torch.tensor([10, 3, 8])
    assert get_num_transfer_tokens(counts, 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [2, 2, 2, 2]]


# ---------------------------------------------------------------- strategy invariants


def _scores(conf: np.ndarray, cand: np.ndarray) -> StepScores:
    c = torch.tensor(conf, dtype=torch.float64)
    m = torch.tensor(cand)
    return StepScores(m, c, c, -c, c)


@pytest.mark.parametrize("tau", [0.3, 0.9, 1.0])
def test_threshold_commits_all_above_tau_and_never_zero(tau):
    rng = np.random.default_rng(0)
    for _ in range(50):
        conf = rng.random((4, 12))
        cand = rng.random((4, 12)) < 0.6
        cand[0] = False
        cand[0, 3] = True
        chosen = select("threshold", _scores(conf, cand), torch.ones(4, dtype=torch.long), tau)
        for b in range(4):
            expect = {j for j in range(12) if cand[b, j] and conf[b, j] >= tau}
            if cand[b].any():
                expect.add(max((j for j in range(12) if cand[b, j]), key=lambda j: conf[b, j]))
            assert set(np.flatnonzero(chosen[b].numpy()).tolist()) == expect


def test_threshold_in_sampler_commits_confident_positions_first_step():
    model = FakeModel(3)
    x = torch.cat([torch.randint(0, 20, (2, 4)), torch.full((2, 20), MASK)], 1)
    mod = torch.zeros_like(x)
    tau = 0.5
    out = sample(model, x, mod, RANGES, MASK, SamplerConfig("threshold", threshold=tau))
    # expected first commit, computed from the first call's logits independently
    logits = FakeModel(3)(x)
    logits[..., 20:] = float("-inf")
    p = logits.softmax(-1).max(-1).values
    second = model.calls[1]
    for b in range(2):
        masked = np.arange(4, 24)
        expect = {int(j) for j in masked if p[b, j] >= tau} | {int(masked[p[b, 4:].argmax()])}
        assert {int(j) for j in masked if second[b, j] != MASK} == expect
    assert (out.tokens != MASK).all()
    assert (out.nfe <= 20).all()


def _mixed_buffer(B: int = 3):
    """Prompt text, then masked text, image and audio spans (with fixed boundary tokens)."""
    g = torch.Generator().manual_seed(5)
    x = torch.full((B, 30), MASK)
    x[:, :4] = torch.randint(0, 20, (B, 4), generator=g)
    mod = torch.zeros(B, 30, dtype=torch.long)
    mod[:, 12:22] = 1
    mod[:, 22:] = 2
    x[:, 12] = 21  # a fixed boundary token inside the image span
    return x, mod


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "policy"] + ["policy"])
@pytest.mark.parametrize("temperature,block", [(0.0, None), (1.0, 5), (0.7, 3)])
def test_ranges_and_no_overwrite(strategy, temperature, block):
    x, mod = _mixed_buffer()
    model = FakeModel(7)
    model.out[:, :] = torch.randn(model.out.shape, dtype=torch.float64)  # unrestricted logits

    def policy(obs):
        return obs.features[..., 0] - 0.5  # commit where confidence > 0.5 (often empty)

    c = SamplerConfig(strategy, steps=8, block_length=block, temperature=temperature, top_k=6)
    out = sample(model, x, mod, RANGES, MASK, c, policy=policy)
    y = out.tokens
    assert (y != MASK).all()
    for m in range(3):
        lo, hi = RANGES[m].tolist()
        sel = (mod == m) & (x == MASK)
        assert ((y[sel] >= lo) & (y[sel] < hi)).all(), f"modality {m} out of range"
    assert torch.equal(y[x != MASK], x[x != MASK])  # condition tokens untouched
    seen = model.calls + [y]
    for prev, nxt in zip(seen, seen[1:]):
        rows = slice(0, len(nxt))
        if len(prev) != len(nxt):  # a finished sample left the batch: compare by content
            continue
        fixed = prev[rows] != MASK
        assert torch.equal(nxt[fixed], prev[rows][fixed]), "a committed token was overwritten"


def test_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(2)
    lens = [3, 6, 4, 5]
    gen = 10
    rows, mods = [], []
    for n in lens:
        rows.append(torch.cat([torch.randint(0, 20, (n,), generator=g), torch.full((gen,), MASK)]))
        m = torch.zeros(n + gen, dtype=torch.long)
        m[n + 6 :] = 1
        mods.append(m)
    L = max(lens) + gen
    xb = torch.full((len(lens), L), PAD)
    mb = torch.full((len(lens), L), 3)
    for i, (r, m) in enumerate(zip(rows, mods)):
        xb[i, : len(r)], mb[i, : len(m)] = r, m
    seeds = [11, 22, 33, 44]
    for c in [
        SamplerConfig("confidence", steps=5, temperature=1.0, top_p=0.9),
        SamplerConfig("threshold", threshold=0.6, temperature=0.8, block_length=4),
        SamplerConfig("random", steps=10, temperature=1.0, cfg_scale=1.0),
        SamplerConfig("entropy", entropy_bound=0.5, temperature=0.5),
        SamplerConfig("margin", steps=4, block_length=5),
    ]:
        cond = (xb != MASK) & (xb != PAD)
        out = sample(FakeModel(1), xb, mb, RANGES, MASK, c, cond=cond, seeds=seeds)
        for i, (r, m) in enumerate(zip(rows, mods)):
            one = sample(FakeModel(1), r[None], m[None], RANGES, MASK, c, seeds=[seeds[i]])
            assert torch.equal(out.tokens[i, : len(r)], one.tokens[0]), (c.strategy, i)
            assert out.nfe[i] == one.nfe[0]
        assert (out.tokens[xb == PAD] == PAD).all()


def test_seeds_change_samples():
    x, mod = _mixed_buffer(2)
    c = SamplerConfig("confidence", steps=6, temperature=1.0)
    a = sample(FakeModel(), x, mod, RANGES, MASK, c, seeds=[0, 1]).tokens
    b = sample(FakeModel(), x, mod, RANGES, MASK, c, seeds=[0, 2]).tokens
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


def test_step_cap_bounds_adaptive_nfe():
    x, mod = _mixed_buffer(2)
    c = SamplerConfig("threshold", threshold=1.0, steps=4, block_length=13)
    out = sample(FakeModel(), x, mod, RANGES, MASK, c)
    assert (out.tokens != MASK).all() and out.nfe.max() <= 4


def test_empty_policy_is_filled_at_the_step_cap():
    x, mod = _mixed_buffer(1)
    model = FakeModel()
    never = lambda obs: torch.zeros_like(obs.masked)  # noqa: E731
    out = sample(model, x, mod, RANGES, MASK, SamplerConfig("policy", steps=5), policy=never)
    assert out.nfe.item() == 5  # empty actions cost a step each; the cap's last step fills all
    assert (out.tokens != MASK).all()
    full = sample(model, x, mod, RANGES, MASK, SamplerConfig("confidence", steps=1))
    assert torch.equal(out.tokens, full.tokens)  # the last step commits every argmax at once


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(strategy="nope", steps=4), "unknown strategy"),
        (dict(strategy="confidence", steps=0), "steps must be >= 1"),
        (dict(strategy="confidence"), "needs a step count"),
        (dict(strategy="threshold", threshold=0.0), "threshold must be in"),
        (dict(strategy="threshold", threshold=1.5), "threshold must be in"),
        (dict(strategy="confidence", steps=4, top_p=0.0), "top_p"),
        (dict(strategy="confidence", steps=4, block_length=0), "block_length"),
    ],
)
def test_bad_settings(kwargs, msg):
    x, mod = _mixed_buffer(1)
    with pytest.raises(SamplingError, match=msg):
        sample(FakeModel(), x, mod, RANGES, MASK, SamplerConfig(**kwargs))


def test_policy_without_callable():
    x, mod = _mixed_buffer(1)
    with pytest.raises(SamplingError, match="policy callable"):
        sample(FakeModel(), x, mod, RANGES, MASK, SamplerConfig("policy"))


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.5, 0), (2.0, 2)])
def test_temperature_draws_follow_softmax(temperature, top_k):
    """The drawn tokens' frequencies match softmax(l / T) (top-k renormalised); -inf never."""
    from megadiff.diffusion.kernels import filter_logits, uniforms
    from megadiff.diffusion.step_scores import draw

    logits = torch.tensor([0.0, 1.0, float("-inf"), 2.0, -1.0])
    n = 40000
    lw = logits.expand(1, n, 5).clone()
    u = uniforms(torch.tensor([n]), 1, [torch.Generator().manual_seed(0)])[0]
    lw = filter_logits(lw, top_k=top_k)
    got = draw(lw, temperature, u, lw.softmax(-1))
    freq = torch.bincount(got[0], minlength=5).double() / n
    want = torch.tensor([1.0, torch.e, 0.0, torch.e**2, 1 / torch.e]).double() ** (1 / temperature)
    if top_k:
        want[[0, 4]] = 0.0  # only the two largest logits (1 and 2) survive
    want /= want.sum()
    assert freq[2] == 0
    assert (freq - want).abs().max() < 0.01, (freq, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.1, 1.0, 8.0])  # flat (full sort) ... peaked (top-k path)
def test_top_p_matches_a_full_sort(scale, dtype):
    from megadiff.diffusion.kernels import filter_logits

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(6, 9, 500, generator=g) * scale).to(dtype)
    logits[0, 0, 100:] = float("-inf")  # a restricted row
    for top_p in (0.5, 0.9, 0.99):
        got = filter_logits(logits, top_p=top_p)
        # reference: keep the most probable tokens until their mass reaches top_p (inclusive)
        p = logits.softmax(-1).double()
        srt, idx = p.sort(-1, descending=True)
        before = srt.cumsum(-1) - srt
        want = torch.zeros_like(p, dtype=torch.bool).scatter(-1, idx, before < top_p)
        assert torch.equal(got > float("-inf"), want), (scale, top_p)
        assert ((got == logits) | (got == float("-inf"))).all()


# ---------------------------------------------------------------- fast kernels vs their definitions


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_in_place_matches_softmax(dtype):
    from megadiff.diffusion.kernels import softmax_

    g = torch.Generator().manual_seed(4)
    x = (torch.randn(5, 7, 300, generator=g) * 4).to(dtype)
    x[0, 0, 17:] = float("-inf")  # a restricted row
    want = x.softmax(-1)
    y = x.clone()
    assert softmax_(y) is y and torch.equal(y, want)  # contiguous: overwritten
    wide = torch.cat([x, x], -1)
    view = wide[..., 300:]  # strided: left alone, the result is a new tensor
    out = softmax_(view)
    assert torch.equal(out, want) and torch.equal(view, x)


def test_row_max_matches_torch_max_with_ties():
    from megadiff.diffusion.kernels import row_max

    g = torch.Generator().manual_seed(0)
    for n in (5, 255, 256, 257, 1031):
        for q in (None, 3.0, 1.0):  # rounding makes many ties (within and across classes)
            x = torch.randn(6, 9, n, generator=g)
            if q:
                x = (x * q).round() / q
            x[0, 0] = 1.0  # a constant row
            x[1, 1, -1] = 50.0  # the maximum in the columns past the last full class
            v, i = row_max(x)
            want_v, want_i = x.max(-1)
            assert torch.equal(v, want_v) and torch.equal(i, want_i), (n, q)


def test_inverse_cdf_matches_a_float64_cumsum():
    from megadiff.diffusion.kernels import inverse_cdf

    g = torch.Generator().manual_seed(1)
    for n in (7, 64, 65, 1031):
        w = torch.rand(5, 40, n, generator=g) ** 6
        w[..., ::3] = 0.0  # restricted columns
        u = torch.rand(5, 40, generator=g, dtype=torch.float64)
        got = inverse_cdf(w, u)
        cdf = w.cumsum(-1, dtype=torch.float64)
        v = (u * cdf[..., -1])[..., None]
        want = torch.searchsorted(cdf, v, right=True).squeeze(-1)
        # equal, except where v is within float32 rounding of a CDF boundary
        near = ((cdf - v).abs() < 1e-6 * cdf[..., -1:]).any(-1)
        assert torch.equal(got[~near], want[~near]), n
        assert (got - want).abs().max() <= (near.any() * n), n
        assert (w.gather(-1, got[..., None]) > 0).all()
    for n in (5, 100):  # a row without weight (a padding slot, all logits -inf): a valid index
        got = inverse_cdf(torch.full((2, n), float("nan")), torch.tensor([0.3, 0.9]))
        assert ((got >= 0) & (got < n)).all()
    w = torch.tensor([[0.0, 0.0, 1.0, 0.0] * 20])  # u at both ends hits the one positive column
    assert inverse_cdf(w, torch.tensor([0.0])).item() == 2
    assert inverse_cdf(w, torch.tensor([1 - 1e-16])).item() == 78


@pytest.mark.parametrize("settings", [{}, {"temperature": 1.0}, {"top_k": 50}])
@pytest.mark.parametrize("strategy", ["confidence", "margin", "entropy"])
def test_step_scores_match_their_definitions(strategy, settings, monkeypatch):
    """Confidence, margin p1 - p2 and entropy the sampler hands to a strategy, recomputed from
    the model's logits (a vocabulary wide enough for the sampler's fast reductions)."""
    import megadiff.diffusion.step_scores as step_scores

    Vb, lo, hi = 700, 0, 600
    mask = Vb - 1
    g = torch.Generator().manual_seed(3)
    table = torch.randn(Vb, 24, Vb, generator=g) * 4  # logits[pos] depend on the token there

    def logits_fn(x):
        return table[x, torch.arange(x.shape[1])]

    x = torch.full((2, 24), mask)
    x[:, :4] = torch.randint(0, hi, (2, 4), generator=g)
    mod = torch.zeros_like(x)
    seen = []
    real_select = step_scores.select

    def spy(name, sc, k, *a, **kw):
        seen.append(sc)
        return real_select(name, sc, k, *a, **kw)

    monkeypatch.setattr(step_scores, "select", spy)
    calls = []

    def fn(t):
        calls.append(t.clone())
        return logits_fn(t)

    ranges = torch.tensor([[lo, hi]])
    c = SamplerConfig(strategy, steps=5, entropy_bound=1.0, **settings)
    sample(fn, x, mod, ranges, mask, c)
    for t, sc in zip(calls, seen):
        for b in range(len(t)):
            pos = (t[b] == mask).nonzero(as_tuple=True)[0]  # candidates, in position order
            lg = logits_fn(t[b : b + 1])[0, pos, lo:hi].double()
            if c.top_k:
                lg = lg.masked_fill(lg < lg.topk(c.top_k, dim=-1).values[:, -1:], float("-inf"))
            p = lg.softmax(-1)
            top2 = p.topk(2, dim=-1).values
            n = len(pos)
            if c.temperature == 0:  # the greedy token's probability (else the drawn one's)
                assert torch.allclose(sc.confidence[b, :n].double(), top2[:, 0], atol=1e-6)
            if strategy == "margin":
                assert torch.allclose(sc.margin[b, :n].double(), top2[:, 0] - top2[:, 1], atol=1e-6)
            if strategy == "entropy":
                h = torch.special.entr(p).sum(-1)
                assert torch.allclose(sc.entropy[b, :n].double(), h, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_top_k_keeps_the_k_largest_logits(dtype):
    from megadiff.diffusion.kernels import filter_logits

    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(3, 7, 300, generator=g) * 3).to(dtype)
    logits[0, 0, 50:] = float("-inf")  # fewer finite logits than k: nothing more removed
    logits[1, 1, :10] = 9.0  # a tie at the k-th value: all of it kept
    for k in (1, 10, 64):
        got = filter_logits(logits, top_k=k)
        kth = logits.float().topk(k, dim=-1).values[..., -1:]
        want = (logits.float() >= kth) & (logits > float("-inf"))
        assert torch.equal(got > float("-inf"), want), (dtype, k)
        assert got.dtype == dtype and ((got == logits) | (got == float("-inf"))).all()


def test_padding_slots_outside_the_window_range_do_not_break_sampling():
    """Rows with different candidate counts in a window whose positions all lie in other
    ranges than the prompt (like t2s: interleaved codebooks): padding slots point at a prompt
    position, whose logits are all -inf inside the window's columns."""
    g = torch.Generator().manual_seed(5)
    x = torch.full((3, 12), PAD)
    mod = torch.full((3, 12), 3)
    for b, n in enumerate((8, 5, 3)):
        x[b, :2] = torch.randint(0, 20, (2,), generator=g)
        mod[b, :2] = 0
        x[b, 2 : 2 + n] = MASK
        mod[b, 2 : 2 + n] = 1 + torch.arange(n) % 2  # image / audio ranges, interleaved
    for c in (
        SamplerConfig("confidence", steps=4, temperature=1.0, top_k=3),
        SamplerConfig("threshold", threshold=0.5, temperature=1.0),
        SamplerConfig("random", steps=3, temperature=0.7, top_p=0.8),
    ):
        out = sample(FakeModel(2), x, mod, RANGES, MASK, c, seeds=[1, 2, 3]).tokens
        gen = x == MASK
        lo, hi = RANGES[mod[gen]].unbind(-1)
        assert ((out[gen] >= lo) & (out[gen] < hi)).all(), c.strategy


def test_strided_logits_are_read_in_place():
    """Logits laid out ``[s, b, V_padded]`` and handed over as a ``[b, s, V]`` view (megatron's
    layout, a vocabulary slice) are read without a copy and sample exactly like contiguous ones."""
    from megadiff.diffusion.kernels import row_view

    x = torch.randn(7, 3, 40).transpose(0, 1)[..., :33]  # [3, 7, 33], non-contiguous
    rows, step_b, step_l = row_view(x)
    assert rows.data_ptr() == x.data_ptr()
    for b in range(3):
        for pos in range(7):
            assert torch.equal(rows[b * step_b + pos * step_l], x[b, pos])

    def strided(fm):
        def fn(t):
            out = fm(t)
            pad = torch.zeros(*out.shape[:2], 5, dtype=out.dtype)
            return torch.cat([out, pad], -1).transpose(0, 1).contiguous().transpose(0, 1)[..., :V]

        return fn

    x, mod = _mixed_buffer(3)
    for c in (
        SamplerConfig("confidence", steps=6, temperature=1.0),
        SamplerConfig("threshold", block_length=4, cfg_scale=1.5),
    ):
        want = sample(FakeModel(), x, mod, RANGES, MASK, c).tokens
        got = sample(strided(FakeModel()), x, mod, RANGES, MASK, c).tokens
        assert torch.equal(got, want), c.strategy


def test_logits_asked_only_at_candidates_sample_like_full_logits():
    """A ``logits_fn`` taking ``positions``/``columns`` is asked only for the candidates' rows
    in their modality's columns, and the sampler reads them right: the same tokens as with
    every position's logits (mixed ranges, blocks, CFG, each strategy)."""
    x, mod = _mixed_buffer(3)
    policy = lambda obs: obs.features[..., 0] > 0.3  # noqa: E731
    asked = []  # (buffer length, positions asked, columns asked) per call
    part = FakeModel()

    def fn(t, positions=None, columns=None):
        lo, hi = columns
        asked.append((t.shape[1], positions.shape[1], hi - lo))
        return part(t).gather(1, positions[..., None].expand(-1, -1, V))[..., lo:hi]

    for c in (
        SamplerConfig("confidence", steps=6, temperature=1.0, top_p=0.8),
        SamplerConfig("threshold", block_length=4, cfg_scale=1.5),
        SamplerConfig("random", steps=9, temperature=0.7),
        SamplerConfig("margin", steps=5, block_length=7, top_k=3),
        SamplerConfig("entropy", entropy_bound=0.3, cfg_scale=0.5, temperature=1.0),
        SamplerConfig("policy", block_length=6),
    ):
        want = sample(FakeModel(), x, mod, RANGES, MASK, c, policy=policy, seeds=[4, 5, 6]).tokens
        got = sample(fn, x, mod, RANGES, MASK, c, policy=policy, seeds=[4, 5, 6]).tokens
        assert torch.equal(got, want), c
    assert all(p < L for L, p, _ in asked)
    widths = {n for *_, n in asked}  # blocks inside one modality ask for its columns only
    assert {38, 20, 10, 8} <= widths and max(widths) == 38, widths


def test_logits_fn_returning_the_wrong_shape_is_an_error():
    x, mod = _mixed_buffer(2)

    def fn(t, positions=None, columns=None):
        return FakeModel()(t)  # every position and column: not what was asked for

    with pytest.raises(SamplingError, match=r"returned shape \(2, 30, 40\)"):
        sample(fn, x, mod, RANGES, MASK, SamplerConfig("confidence", steps=4))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_random_strategy_first_step_matches_a_reference(temperature):
    """`random` commits the k candidates with the largest second uniforms of each sample's
    stream and draws their tokens by inverse CDF with the first ones (reference: a float64
    cumsum over the whole row), reading only the committed positions' logits."""
    fm = FakeModel(4)
    B, P, n, steps = 3, 2, 12, 4
    x = torch.full((B, P + n), MASK)
    x[:, :P] = torch.randint(0, 20, (B, P), generator=torch.Generator().manual_seed(1))
    mod = torch.zeros_like(x)
    cfg = SamplerConfig("random", steps=steps, temperature=temperature)
    seeds = [5, 6, 7]
    out = sample(fm, x, mod, RANGES, MASK, cfg, seeds=seeds)
    first = fm.calls[1] if len(fm.calls) > 1 else out.tokens  # the buffer after step one
    logits = fm(x)[:, P:, 0:20].double()
    for b, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        u_tok = torch.rand(n, generator=g, dtype=torch.float64) if temperature > 0 else None
        u_pick = torch.rand(n, generator=g, dtype=torch.float64).float()
        picked = set(u_pick.topk(n // steps).indices.tolist())
        assert {j for j in range(n) if first[b, P + j] != MASK} == picked
        for j in picked:
            if temperature == 0:
                want = int(logits[b, j].argmax())
            else:
                cdf = (logits[b, j] / temperature).softmax(-1).cumsum(-1)
                want = int(torch.searchsorted(cdf, u_tok[j] * cdf[-1], right=True))
            assert int(first[b, P + j]) == want, (b, j)


def test_top_p_edge_is_exact_where_the_mass_lands_on_top_p():
    """top_p set to the exact float64 mass of a row's k largest probabilities keeps exactly those
    k (the chunked sum must not move the edge by its rounding)."""
    from megadiff.diffusion.kernels import filter_logits

    g = torch.Generator().manual_seed(11)
    for scale, n in ((0.05, 1024), (1.0, 1237), (4.0, 1024)):
        logits = torch.randn(1, n, generator=g) * scale
        desc = logits.softmax(-1).double().sort(-1, descending=True).values[0]
        for k in (3, 70, 333, n // 2, n - 5):
            top_p = float(desc[:k].sum())
            if top_p >= 1.0:
                continue
            kept = int((filter_logits(logits, top_p=top_p) > float("-inf")).sum())
            ties = int((desc == desc[k - 1]).sum()) - 1  # the edge's ties are kept too
            assert k <= kept <= k + ties, (scale, n, k, kept)
