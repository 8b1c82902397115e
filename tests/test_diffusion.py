"""Schedules, t sampling, masking and the ELBO loss (single process, no parallel state)."""

from __future__ import annotations

import math

import pytest
import torch

from megadiff.config import DiffusionConfig
from megadiff.diffusion.objective import MaskingObjective, noise_generator, sample_t, summarize
from megadiff.diffusion.schedules import SCHEDULES, Schedule


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_endpoints_and_monotone(name):
    s = Schedule(name)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    a = s.alpha(t)
    assert a[0] == pytest.approx(1.0)
    assert a[-1] == pytest.approx(0.0, abs=1.01e-3)  # log-linear stops at eps = 1e-3
    assert (a[1:] <= a[:-1]).all()


@pytest.mark.parametrize("name", SCHEDULES)
def test_weight_matches_finite_difference(name):
    s = Schedule(name, exponent=3.0)
    t = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    h = 1e-6
    d_alpha = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    expected = -d_alpha / (1 - s.alpha(t))
    assert torch.allclose(s.weight(t), expected, rtol=1e-6)


def test_known_weights():
    t = torch.tensor([0.25, 0.5])
    assert torch.allclose(Schedule("linear").weight(t), 1 / t)
    assert torch.allclose(Schedule("polynomial", exponent=2.0).weight(t), 2 / t)
    c = Schedule("cosine").weight(torch.tensor([0.5]))
    expected = (math.pi / 2) * math.sin(math.pi / 4) / (1 - math.cos(math.pi / 4))
    assert c.item() == pytest.approx(expected, rel=1e-6)


def test_antithetic_covers_unit_interval():
    g = torch.Generator().manual_seed(0)
    t = sample_t(64, g, "antithetic", t_min=0.0)
    pairs = t[:32] + t[32:]
    assert torch.allclose(pairs, torch.ones(32), atol=1e-6)  # u and 1-u
    assert t.min() < 0.1 and t.max() > 0.9
    s = sample_t(64, torch.Generator().manual_seed(1), "stratified", t_min=0.0)
    bins = torch.floor(s.double() * 64).long().clamp(max=63)
    assert len(set(bins.tolist())) >= 63  # one per stratum (a boundary can shift by one)
    u = sample_t(1000, torch.Generator().manual_seed(2), "uniform", t_min=0.2)
    assert u.min() >= 0.2 and u.max() <= 1.0


def _objective(**kw) -> MaskingObjective:
    return MaskingObjective(DiffusionConfig(**kw), mask_id=98, pad_id=99)


def test_masking_rate_follows_schedule():
    obj = _objective(t_sampling="uniform", random_length_prob=0.0)
    tokens = torch.randint(0, 90, (256, 64))
    c = obj.corrupt(tokens, torch.zeros_like(tokens), torch.Generator().manual_seed(0))
    frac = (c.inputs == 98).float().mean(1)
    assert torch.corrcoef(torch.stack([frac, c.t]))[0, 1] > 0.95  # linear: P(mask) = t
    assert torch.equal(c.targets, tokens)
    masked = c.inputs == 98
    assert torch.allclose(c.weight[masked], (1 / c.t)[:, None].expand_as(c.weight)[masked])
    assert (c.weight[~masked] == 0).all()


def test_padding_is_never_masked_and_masks_attention():
    obj = _objective(random_length_prob=0.0)
    tokens = torch.randint(0, 90, (4, 16))
    tokens[:, 12:] = 99
    c = obj.corrupt(tokens, torch.zeros_like(tokens), torch.Generator().manual_seed(0))
    assert (c.inputs[:, 12:] == 99).all() and (c.weight[:, 12:] == 0).all()
    assert c.attention_mask is not None and c.attention_mask[:, 0, 0, 12:].all()
    assert not c.attention_mask[:, 0, 0, :12].any()


def test_whole_modality_masking():
    obj = _objective(modality_mask_prob=1.0, random_length_prob=0.0)
    tokens = torch.randint(0, 90, (32, 12))
    modality = torch.tensor([0] * 6 + [1] * 6).expand(32, 12)
    c = obj.corrupt(tokens, modality, torch.Generator().manual_seed(0))
    masked = c.inputs == 98
    text_all = masked[:, :6].all(1)
    image_all = masked[:, 6:].all(1)
    assert (text_all | image_all).all()  # every (bi-modal) row has one modality fully masked


def test_clean_prompt_known_prompt_lengths():
    """Text rows with a known prompt (``prompt[b]`` > 0: one problem per row) keep exactly that
    many leading tokens clean and noise the rest as without the option; rows of unknown prompt
    (0) keep a random prefix as before."""
    gen = torch.Generator
    tokens = torch.randint(0, 90, (256, 16), generator=gen().manual_seed(2))
    modality = torch.zeros_like(tokens)
    prompt = torch.tensor([5, 0] * 128)
    plain = _objective(random_length_prob=0.0)
    clean = _objective(random_length_prob=0.0, clean_prompt_prob=1.0)
    a = plain.corrupt(tokens, modality, gen().manual_seed(0))
    b = clean.corrupt(tokens, modality, gen().manual_seed(0), prompt)
    c = clean.corrupt(tokens, modality, gen().manual_seed(0))  # no prompt lengths given
    masked_a, masked_b, masked_c = a.inputs == 98, b.inputs == 98, c.inputs == 98
    known = prompt > 0
    assert not masked_b[known, :5].any()
    assert torch.equal(masked_b[known, 5:], masked_a[known, 5:])
    assert masked_b[known, 5:].any() and masked_c[known, :5].any()  # not a random prefix
    assert torch.equal(masked_b[~known], masked_c[~known])


def test_clean_prompt_rows_noise_only_what_they_generate():
    """clean_prompt_prob=1: a paired row (<t2i> caption <boi> codes) keeps its first 6 positions
    (task token + caption) unmasked; a text row keeps a prefix; the same draws otherwise."""
    gen = torch.Generator
    paired = torch.tensor([0] * 6 + [1] * 10)
    modality = torch.stack([paired] * 64 + [torch.zeros(16, dtype=torch.long)] * 64)
    tokens = torch.randint(0, 90, (128, 16), generator=gen().manual_seed(1))
    plain = _objective(random_length_prob=0.0)
    clean = _objective(random_length_prob=0.0, clean_prompt_prob=1.0)
    a = plain.corrupt(tokens, modality, gen().manual_seed(0))
    b = clean.corrupt(tokens, modality, gen().manual_seed(0))
    masked_a, masked_b = a.inputs == 98, b.inputs == 98
    assert torch.equal(a.t, b.t)
    assert not masked_b[:64, :6].any()  # the prompt of every paired row is clean
    assert torch.equal(masked_b[:64, 6:], masked_a[:64, 6:])  # its image noised as before
    assert masked_a[:64, :6].any()  # (without the option the captions are noised too)
    for row in range(64, 128):  # text rows: clean prefix, then the same masks as before
        k = int((~masked_b[row]).long().cumprod(0).sum()) if masked_b[row].any() else 16
        assert not masked_b[row, :k].any()
        start = int(masked_b[row].nonzero()[0]) if masked_b[row].any() else 16
        assert torch.equal(masked_b[row, start:], masked_a[row, start:])
    prefix = [int((b.inputs[r] == 98).long().argmax()) for r in range(64, 128) if masked_b[r].any()]
    assert len(set(prefix)) > 4  # the split point varies from row to row
    assert torch.equal(b.weight[masked_b], a.weight[masked_b])  # same ELBO weights


def test_noise_key_reproducible_and_distinct():
    obj = _objective()
    tokens = torch.randint(0, 90, (8, 32))
    mod = torch.zeros_like(tokens)

    def inputs(*key):
        return obj.corrupt(tokens, mod, noise_generator(*key)).inputs

    assert torch.equal(inputs(1, 5, 0, 0, 2), inputs(1, 5, 0, 0, 2))
    assert not torch.equal(inputs(1, 5, 0, 0, 2), inputs(1, 5, 1, 0, 2))  # other DP rank
    assert not torch.equal(inputs(1, 5, 0, 0, 2), inputs(1, 6, 0, 0, 2))  # other step
    assert not torch.equal(inputs(1, 5, 0, 0, 2), inputs(2, 5, 0, 0, 2))  # other seed
    # the key is the global micro-batch: DP rank 1 / micro-batch 0 of 1 == micro-batch 1 of 2
    assert torch.equal(inputs(1, 5, 1, 0, 1), inputs(1, 5, 0, 1, 2))


@pytest.fixture(scope="module")
def single_rank_groups():
    """A one-process world so megatron-core's vocab-parallel cross entropy can run."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megadiff.parallel import cpu_compat

    cpu_compat.enable()
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def test_perfect_predictor_has_zero_loss(single_rank_groups):
    obj = _objective()
    tokens = torch.randint(0, 90, (4, 16))
    c = obj.corrupt(tokens, torch.zeros_like(tokens), torch.Generator().manual_seed(0))
    logits = torch.full((16, 4, 100), -1e4)
    logits.scatter_(2, tokens.t()[:, :, None], 1e4)
    loss, stats = obj.loss(logits, c)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert summarize(stats)["loss"] == pytest.approx(0.0, abs=1e-6)


def test_uniform_predictor_loss_is_weighted_log_v(single_rank_groups):
    obj = _objective()
    tokens = torch.randint(0, 90, (4, 16))
    c = obj.corrupt(tokens, torch.zeros_like(tokens), torch.Generator().manual_seed(0))
    loss, stats = obj.loss(torch.zeros(16, 4, 100), c)
    expected = math.log(100) * c.weight.sum().item() / c.weight.numel()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert summarize(stats)["loss_text"] == pytest.approx(expected, rel=1e-5)


def test_restrict_to_modality_masks_other_ranges():
    from megadiff.diffusion.objective import restrict_to_modality

    ranges = torch.tensor([[0, 4], [4, 6], [6, 9], [9, 10]])
    logits = torch.zeros(2, 3, 10)  # [s, b, V]
    modality = torch.tensor([[0, 1], [2, 0], [3, 1]]).t()  # [s, b] given as [b, s].t()
    out = restrict_to_modality(logits, modality, ranges)
    finite = torch.isfinite(out)
    for s in range(2):
        for b in range(3):
            lo, hi = ranges[modality[s, b]].tolist()
            expect = [lo <= v < hi for v in range(10)]
            assert finite[s, b].tolist() == expect
    # a TP shard: columns 5..9 of the same vocabulary
    shard = restrict_to_modality(logits[..., 5:], modality, ranges, col_offset=5)
    assert torch.equal(torch.isfinite(shard), finite[..., 5:])


def test_restricted_loss_is_lower_for_uniform_logits(single_rank_groups):
    ranges = torch.tensor([[0, 40], [40, 80], [80, 98], [99, 100]])
    tokens = torch.randint(0, 40, (4, 16))
    mod = torch.zeros_like(tokens)
    plain = _objective()
    restricted = MaskingObjective(
        DiffusionConfig(restrict_loss_to_modality=True), mask_id=98, pad_id=99, ranges=ranges
    )
    c = plain.corrupt(tokens, mod, torch.Generator().manual_seed(0))
    lp, _ = plain.loss(torch.zeros(16, 4, 100), c)
    lr, _ = restricted.loss(torch.zeros(16, 4, 100), c)
    w = c.weight.sum().item() / c.weight.numel()
    assert lp.item() == pytest.approx(math.log(100) * w, rel=1e-5)
    assert lr.item() == pytest.approx(math.log(40) * w, rel=1e-5)  # text range has 40 ids
