"""Block KV caches (``cache`` prefix / dual) on the plain-PyTorch model: the span forward against
an uncached forward, the sampler against a reference loop with its own stale-key attention,
refreshes at block boundaries, every strategy, CFG and batches of different prompt lengths; and
on the megatron-core model at TP=1 and TP=2 (gloo worlds) against each other and the
plain-PyTorch model with the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megadiff.diffusion.block_cache import CacheCall
from megadiff.diffusion.sampling import SamplerConfig, SamplingError, sample
from megadiff.diffusion.strategies import STRATEGIES
from megadiff.generation.adapters import reference_logits_fn
from megadiff.generation.cli import main as generate_main
from megadiff.generation.settings import sampler_config
from megadiff.hf.network_megadiff import apply_rope, rope_cos_sin
from megadiff.model.reference import ReferenceConfig, ReferenceModel
from megadiff.parallel.launch import run_world
from tests.sampling_workers import CACHED_SETTINGS, cached_sampling

V, PAD, MASK = 120, 118, 119
RANGES = torch.tensor([[0, 100], [100, 118], [PAD, PAD + 1]])  # text, other, pad


def tiny_model(seed: int = 0) -> ReferenceModel:
    """2 layers, GQA (4 heads, 2 groups), QK-norm; float64 so that orderings of equal sums
    cannot flip a greedy choice."""
    torch.manual_seed(seed)
    m = ReferenceModel(ReferenceConfig(2, 32, 4, 2, 64, V - 2, V, qk_layernorm=True)).double()
    for p in m.parameters():  # peaked enough that strategies differ
        p.data.mul_(3.0)
    return m.eval()


def buffer(prompts: list[int], gen: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``prompts[i]`` text tokens + ``gen`` MASK, right-padded with PAD."""
    g = torch.Generator().manual_seed(seed)
    L = max(prompts) + gen
    x = torch.full((len(prompts), L), PAD)
    for i, p in enumerate(prompts):
        x[i, :p] = torch.randint(0, 100, (p,), generator=g)
        x[i, p : p + gen] = MASK
    mod = torch.where(x == PAD, 2, 0)
    return x, mod


# ------------------------------------------------ a reference with its own stale-key attention


def stale_forward(m: ReferenceModel, x: torch.Tensor, old_kv=None, fresh=None):
    """Logits ``[b, L, V]`` of every position, where at every layer the keys/values of the
    positions outside ``fresh`` (``[b, L]`` bool) are ``old_kv``'s (one ``(k, v)`` per layer,
    ``[b, g, L, d]``); also returns this forward's own ``(k, v)`` per layer. Written from the
    architecture, independently of the cache code: every position is computed, nothing
    gathered or scattered."""
    a = m.arch
    d = a.hidden_size // a.num_attention_heads
    g, per = a.num_query_groups, a.num_attention_heads // a.num_query_groups
    cos, sin = rope_cos_sin(x.shape[1], d, a.rotary_base)
    attend = (x != PAD)[:, None, None, :]
    h = m.embedding.word_embeddings(x)
    kvs = []
    for i, layer in enumerate(m.decoder.layers):
        att = layer.self_attention
        b, s, _ = h.shape
        qkv = att.linear_qkv(layer.input_layernorm(h)).view(b, s, g, per + 2, d)
        q = att.q_layernorm(qkv[:, :, :, :per].reshape(b, s, g * per, d).transpose(1, 2))
        k = att.k_layernorm(qkv[:, :, :, per].transpose(1, 2))
        v = qkv[:, :, :, per + 1].transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kvs.append((k, v))
        if old_kv is not None:
            keep = fresh[:, None, :, None]
            k, v = torch.where(keep, k, old_kv[i][0]), torch.where(keep, v, old_kv[i][1])
        k, v = k.repeat_interleave(per, 1), v.repeat_interleave(per, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        h = h + att.linear_proj(o.transpose(1, 2).reshape(b, s, -1))
        h = h + layer.mlp(layer.pre_mlp_layernorm(h))
    out = m.decoder.final_layernorm(h) @ m.output_layer.weight.T
    out[..., a.vocab_size :] = float("-inf")
    return out, kvs


def reference_cached_loop(m, x, prompt, gen, block, steps_per_block, mode):
    """Fast-dLLM's cached greedy confidence decoding, one prompt length for every row."""
    x = x.clone()
    L = x.shape[1]
    for nb in range(gen // block):
        lo, hi = prompt + nb * block, prompt + (nb + 1) * block
        fresh = torch.zeros_like(x, dtype=torch.bool)
        fresh[:, lo : (L if mode == "prefix" else hi)] = True
        n_masked = (x[:, lo:hi] == MASK).sum(1)
        per_step = n_masked // steps_per_block
        extra = n_masked % steps_per_block
        for i in range(steps_per_block):
            if i == 0:
                logits, old_kv = stale_forward(m, x)
            else:
                logits, _ = stale_forward(m, x, old_kv, fresh)
            logits = logits[..., :100]  # the text range
            p = logits.softmax(-1)
            conf, tok = p.max(-1)
            conf = torch.where(x == MASK, conf, -1.0)
            conf[:, :lo], conf[:, hi:] = -1.0, -1.0
            for r in range(len(x)):
                k = int(per_step[r] + (i < extra[r]))
                sel = conf[r].topk(k).indices
                x[r, sel] = tok[r, sel]
    return x


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("block,steps", [(4, 8), (8, 8)])
def test_cached_sampler_matches_a_reference_loop(mode, block, steps):
    m = tiny_model()
    gen, prompt = 16, 6
    x, mod = buffer([prompt, prompt], gen)
    x = x[:, : prompt + gen]
    mod = mod[:, : prompt + gen]
    per_block = steps // (gen // block)
    ref = reference_cached_loop(m, x, prompt, gen, block, per_block, mode)
    c = SamplerConfig("confidence", steps=steps, block_length=block, cache=mode)
    out = sample(reference_logits_fn(m, PAD, V - 2), x, mod, RANGES, MASK, c)
    assert torch.equal(out.tokens, ref)
    assert out.nfe.tolist() == [steps, steps]  # a cached step is one forward


# ------------------------------------------------------------------------ the span forward


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_span_forward_on_unchanged_tokens_equals_the_full_forward(mode):
    m = tiny_model()
    fn = reference_logits_fn(m, PAD, V - 2)
    x, _ = buffer([5, 9, 3], 20, seed=1)
    x[x == MASK] = 7  # any tokens: a freshly filled cache is not stale
    L = x.shape[1]
    call = CacheCall()
    full = fn(x, cache=call)
    assert torch.equal(full, fn(x))  # the filling forward is the uncached one, bit for bit
    assert len(call.past) == 2 and call.past[0].shape == (3, 2, 2, L + 1, 8)
    start = torch.tensor([5, 13, 3])
    length = L - start if mode == "prefix" else torch.tensor([8, 4, 16])
    at = start[:, None] + torch.tensor([0, 3, 1])
    part = fn(x, positions=at, columns=(2, 90), cache=CacheCall(call.past, start, length))
    want = full.gather(1, at[..., None].expand(-1, -1, full.shape[-1]))[..., 2:90]
    torch.testing.assert_close(part, want, rtol=0, atol=1e-12)


# ------------------------------------------------------- refreshes at block boundaries


def test_first_step_of_each_block_is_an_uncached_forward_that_refreshes_the_cache():
    m = tiny_model()
    inner = reference_logits_fn(m, PAD, V - 2)
    calls = []

    def fn(tokens, positions=None, columns=None, cache=None):
        filling = cache is not None and cache.past is None
        past_in = None if filling else [t.clone() for t in cache.past]
        out = inner(tokens, positions, columns, cache)
        calls.append((filling, tokens.clone(), out.clone(), past_in, cache, positions, columns))
        return out

    gen, block, steps = 12, 4, 6  # 3 blocks of 2 steps
    x, mod = buffer([5, 8], gen)
    c = SamplerConfig("confidence", steps=steps, block_length=block, cache="dual")
    sample(fn, x, mod, RANGES, MASK, c)
    assert [f for f, *_ in calls] == [True, False] * 3
    last_fill = None
    for nb, (filling, tokens, out, past_in, cache, pos, cols) in enumerate(calls):
        if filling:  # the block's first step: exactly the uncached forward on those tokens
            assert torch.equal(out, inner(tokens, pos, cols))
            block_no = nb // 2
            for r, p in enumerate((5, 8)):  # earlier blocks committed, the rest still masked
                masked = (tokens[r] == MASK).nonzero().squeeze(1)
                assert masked.tolist() == list(range(p + block_no * block, p + gen))
            last_fill = cache.past
            continue
        # later steps read the cache of the last refresh (outside their span, untouched)
        for got, filled in zip(past_in, last_fill):
            for r in range(2):
                s, n = int(cache.start[r]), int(cache.length[r])
                outside = torch.ones(got.shape[3], dtype=torch.bool)
                outside[s : s + n] = False
                assert torch.equal(got[r][:, :, outside], filled[r][:, :, outside])
        # and they are an approximation: the uncached forward differs
        assert not torch.allclose(out, inner(tokens, pos, cols))


# ------------------------------------------- strategies, CFG, different prompt lengths


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "policy"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_every_strategy_runs_with_a_cache(strategy, mode):
    m = tiny_model()
    fn = reference_logits_fn(m, PAD, V - 2)
    x, mod = buffer([4, 9, 6], 16, seed=2)
    temperature = 1.0 if strategy == "random" else 0.0
    c = SamplerConfig(
        strategy, steps=8, block_length=8, cache=mode, cfg_scale=1.0, temperature=temperature
    )
    out = sample(fn, x, mod, RANGES, MASK, c)
    fixed = x != MASK
    assert torch.equal(out.tokens[fixed], x[fixed])  # prompt and padding untouched
    filled = out.tokens[~fixed]
    assert bool(((filled >= 0) & (filled < 100)).all())  # the text range, no MASK left
    assert torch.equal(out.nfe, 2 * out.steps)  # CFG: two forwards a step, cached or not
    assert bool((out.steps <= 8).all())


def test_batched_rows_of_different_prompt_lengths_equal_one_by_one():
    m = tiny_model()
    fn = reference_logits_fn(m, PAD, V - 2)
    prompts = [3, 10, 6]
    x, mod = buffer(prompts, 16, seed=3)
    c = SamplerConfig("threshold", threshold=0.7, block_length=4, cache="dual", cfg_scale=0.5)
    cond = (x != MASK) & (x != PAD)  # the prompts (as generation's requests say)
    batched = sample(fn, x, mod, RANGES, MASK, c, cond, seeds=[0, 1, 2])
    for i, p in enumerate(prompts):
        L = p + 16
        xi, mi, ci = (t[i : i + 1, :L] for t in (x, mod, cond))
        one = sample(fn, xi, mi, RANGES, MASK, c, ci, seeds=[i])
        assert torch.equal(batched.tokens[i, :L], one.tokens[0])
        assert int(batched.nfe[i]) == int(one.nfe[0])


def test_cache_none_calls_the_model_as_without_a_cache():
    m = tiny_model()
    inner = reference_logits_fn(m, PAD, V - 2)
    seen = []

    def fn(tokens, positions=None, columns=None, cache=None):
        seen.append(cache)
        return inner(tokens, positions, columns)

    def plain(tokens, positions=None, columns=None):
        return inner(tokens, positions, columns)

    x, mod = buffer([5, 7], 12)
    c = SamplerConfig("margin", steps=6, block_length=4, temperature=0.8)
    a = sample(fn, x, mod, RANGES, MASK, c)
    assert seen and all(s is None for s in seen)
    assert torch.equal(a.tokens, sample(plain, x, mod, RANGES, MASK, c).tokens)


# ------------------------------------------------------------------- bad combinations


def test_a_cache_without_blocks_or_model_support_is_an_error():
    with pytest.raises(SamplingError, match="needs semi-autoregressive blocks"):
        SamplerConfig("threshold", cache="dual").validate()
    with pytest.raises(SamplingError, match="unknown cache 'full'"):
        SamplerConfig("threshold", block_length=4, cache="full").validate()
    with pytest.raises(SamplingError, match="strategy 'policy'.*use cache 'none'"):
        SamplerConfig("policy", block_length=4, cache="prefix").validate()
    x, mod = buffer([4], 8)

    def no_cache(tokens, positions=None, columns=None):
        return torch.zeros(tokens.shape[0], positions.shape[1], columns[1] - columns[0])

    c = SamplerConfig("threshold", block_length=4, cache="prefix")
    with pytest.raises(SamplingError, match="needs a logits_fn that takes"):
        sample(no_cache, x, mod, RANGES, MASK, c)
    fn = reference_logits_fn(tiny_model(), PAD, V - 2)
    with pytest.warns(UserWarning, match="every sample has a single block"):
        sample(fn, x, mod, RANGES, MASK, SamplerConfig("threshold", block_length=8, cache="dual"))
    with pytest.raises(SamplingError, match="needs semi-autoregressive blocks"):
        sampler_config("t2i", {"cache": "dual"})  # t2i's defaults: one block


def test_cli_cache_without_blocks_exits_2(tmp_path, capsys):
    args = ["--ckpt", str(tmp_path / "none"), "--task", "text", "--prompt", "a"]
    assert generate_main([*args, "--cache", "dual", "--block-length", "0"]) == 2
    assert "needs semi-autoregressive blocks" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        generate_main([*args, "--cache", "full"])
    assert e.value.code == 2


# ------------------------------------------------ the megatron-core model under TP (gloo)

TP_MODEL = [
    "model.seq_length=32",
    "model.num_query_groups=2",  # GQA: one query group per TP=2 rank
    "model.qk_layernorm=true",
    "model.init_method_std=0.3",  # peaked: the strategies' choices are not near-ties
    "logging.tensorboard=false",
]


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    """:func:`cached_sampling` at TP=1 (rank 0) and TP=2 (both ranks): 4-layer megatron-core
    models (GQA, QK-norm) with the same weights, rows of prompts 3, 9, 6 + 16 MASK."""
    base = tmp_path_factory.mktemp("tp")
    args = ([3, 9, 6], 16)
    tp1 = run_world(cached_sampling, 1, (TP_MODEL, str(base / "tp1"), *args), timeout=900)
    tp2_model = [*TP_MODEL, "parallel.tensor_parallel=2"]
    tp2 = run_world(cached_sampling, 2, (tp2_model, str(base / "tp2"), *args), timeout=900)
    return tp1[0], tp2


def test_megatron_cached_forward_at_a_block_start_is_the_uncached_one(tp_runs):
    tp1, tp2 = tp_runs
    for run in (tp1, *tp2):
        assert run["first"].shape == (3, 3, 87)
        assert torch.equal(run["first"], run["uncached"])  # exact, at TP=1 and on each TP=2 rank
    torch.testing.assert_close(tp2[0]["first"], tp1["first"], rtol=0, atol=1e-4)


def test_megatron_cached_sampling_at_tp2_equals_tp1(tp_runs):
    tp1, tp2 = tp_runs
    for name in CACHED_SETTINGS:
        assert torch.equal(tp2[0]["tokens"][name], tp2[1]["tokens"][name]), name
        assert torch.equal(tp2[0]["tokens"][name], tp1["tokens"][name]), name
    x = tp1["x"]
    for name, tokens in tp1["tokens"].items():
        fixed = x != tp1["mask_id"]
        assert torch.equal(tokens[fixed], x[fixed]), name  # prompts and padding untouched
        assert not bool((tokens == tp1["mask_id"]).any()), name
    # the caches are approximations in use: some tokens differ from the exact sampler's
    assert not torch.equal(tp1["tokens"]["dual"], tp1["tokens"]["none"])


def test_megatron_cached_sampling_equals_the_plain_pytorch_models(tp_runs):
    """Same weights, same sampler settings: the megatron-core cache (megatron's layers, its core
    attention keeping and reading keys/values) makes the plain-PyTorch model's approximation,
    checked above against a stale-key reference loop."""
    tp1, _ = tp_runs
    from megadiff.config import load_config
    from tests.workers import TINY

    mc = load_config(None, [*TINY, *TP_MODEL]).model
    m = ReferenceModel(ReferenceConfig.from_model_config(mc))
    m.load_state_dict(tp1["params"])
    fn = reference_logits_fn(m, tp1["pad_id"], mc.vocab_size)
    inputs = (tp1["x"], tp1["mod"], tp1["ranges"], tp1["mask_id"])
    for name, settings in CACHED_SETTINGS.items():
        got = sample(fn, *inputs, SamplerConfig(**settings), tp1["cond"]).tokens
        assert torch.equal(got, tp1["tokens"][name]), name


def test_megatron_cache_refused_without_a_core_attention_that_takes_it(tp_runs):
    for run in (tp_runs[0], *tp_runs[1]):
        assert "needs its local layers (model.transformer_impl=local)" in run["refused"]
