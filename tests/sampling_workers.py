"""Module-level functions run inside gloo worlds by the sampling tests."""

from __future__ import annotations

import os

TINY_DEMO = [
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=64",
    "model.seq_length=160",
    "data.source=mds",
    "train.micro_batch=4",
    "train.global_batch=4",
    "optim.lr=1e-3",
    "optim.warmup_tokens=16",
    "logging.progress=false",
]


def train_and_logits(overrides: list[str], run_dir: str, tokens) -> dict:
    """Train one step, save the run's distributed checkpoint, return the TP-gathered logits."""
    import torch

    from megadiff.config import load_config
    from megadiff.generation.adapters import megatron_logits_fn
    from megadiff.parallel.state import destroy_distributed
    from megadiff.plan import resolve
    from megadiff.training.trainer import Trainer

    world = int(os.environ["WORLD_SIZE"])
    plan = resolve(load_config(None, [*TINY_DEMO, f"run.dir={run_dir}", *overrides]), world)
    trainer = Trainer(plan)
    cfg = plan.cfg
    trainer.train_step()
    trainer.save_checkpoint()
    fn = megatron_logits_fn(trainer.model, trainer.source.pad_id, cfg.model.vocab_size)
    logits = fn(tokens)
    at = torch.tensor([[5, 0, 23], [11, 11, 2]])  # some positions and columns only
    part = fn(tokens, positions=at, columns=(7, 300))
    destroy_distributed()
    return {"logits": logits, "part": part, "at": at}


def cached_sampling(overrides: list[str], run_dir: str, prompts: list[int], gen: int) -> dict:
    """The megatron-core model of a Trainer (initialised, layout-independent weights) sampled
    through :func:`megatron_logits_fn` with and without a block KV cache: text buffers of
    ``prompts[i]`` random tokens + ``gen`` MASK, right-padded. Returns on every rank the
    buffer, the first cached forward and the uncached one on the same tokens, and the tokens of
    each sampler setting (:data:`CACHED_SETTINGS`), the message refusing a cache where a layer's
    core attention cannot take one; rank 0 also the full parameters."""
    import torch
    from torch.nn import Identity

    from megadiff.config import load_config
    from megadiff.diffusion.block_cache import CacheCall
    from megadiff.diffusion.sampling import SamplerConfig, sample
    from megadiff.generation.adapters import megatron_logits_fn
    from megadiff.model.gather import full_tensors, unwrap
    from megadiff.parallel.state import destroy_distributed
    from megadiff.plan import resolve
    from megadiff.training.trainer import Trainer
    from tests.workers import TINY

    world = int(os.environ["WORLD_SIZE"])
    plan = resolve(load_config(None, [*TINY, f"run.dir={run_dir}", *overrides]), world)
    trainer = Trainer(plan)
    v = trainer.source.vocab
    x, mod, cond = text_buffer(v, prompts, gen)
    ranges = torch.from_numpy(v.ranges_array())
    fn = megatron_logits_fn(trainer.model, v.pad_id, plan.cfg.model.vocab_size)
    at = torch.tensor([[0, 5, 9], [2, 2, 7], [11, 1, 3]])[: len(x)]
    first = fn(x, positions=at, columns=(3, 90), cache=CacheCall())
    uncached = fn(x, positions=at, columns=(3, 90))
    out = {"x": x, "mod": mod, "cond": cond, "ranges": ranges, "mask_id": v.mask_id}
    out.update(first=first, uncached=uncached, pad_id=v.pad_id, tokens={})
    for name, settings in CACHED_SETTINGS.items():
        c = SamplerConfig(**settings)
        out["tokens"][name] = sample(fn, x, mod, ranges, v.mask_id, c, cond).tokens
    params = full_tensors(trainer.model)
    if trainer.ranks.rank == 0:
        out["params"] = params
    # core attention that cannot take a cache (as Transformer Engine's): refused by name
    unwrap(trainer.model[0]).decoder.layers[0].self_attention.core_attention = Identity()
    try:
        megatron_logits_fn(trainer.model, v.pad_id, plan.cfg.model.vocab_size)(x, cache=CacheCall())
    except ValueError as e:
        out["refused"] = str(e)
    destroy_distributed()
    return out


CACHED_SETTINGS = {
    "none": dict(strategy="confidence", steps=8, block_length=4),
    "prefix": dict(strategy="confidence", steps=8, block_length=4, cache="prefix"),
    "dual": dict(strategy="confidence", steps=8, block_length=4, cache="dual"),
    "prefix_cfg_threshold": dict(
        strategy="threshold", threshold=0.3, block_length=4, cache="prefix", cfg_scale=1.0
    ),
    "dual_cfg_margin": dict(
        strategy="margin", steps=6, block_length=8, cache="dual", cfg_scale=0.5
    ),
}


def text_buffer(vocab, prompts: list[int], gen: int, seed: int = 0):
    """Rows of ``prompts[i]`` random text tokens + ``gen`` MASK, right-padded with PAD: tokens,
    modality (text; PAD's row of ``ranges_array``) and the CFG condition (the prompts)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.full((len(prompts), max(prompts) + gen), vocab.pad_id)
    for i, p in enumerate(prompts):
        x[i, :p] = torch.randint(0, vocab.text_size, (p,), generator=g)
        x[i, p : p + gen] = vocab.mask_id
    mod = torch.where(x == vocab.pad_id, 3, 0)
    cond = (x != vocab.mask_id) & (x != vocab.pad_id)
    return x, mod, cond
