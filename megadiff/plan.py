"""The run's plan: a config checked against a world size, and the values derived from it.

:func:`resolve` applies the rules between sections (model shape vs TP/PP/VPP, world size vs
TP x PP x DP, batch vs DP, what an engine cannot do), reads the data's vocabulary layout and
solves the optimizer recipe, once, into an immutable :class:`Plan` that the rest of megadiff
reads. It runs before any process group or model exists and raises
:class:`~megadiff.config.ConfigError` naming the key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from megadiff.config import Config, ConfigError, DataConfig, check, check_sections
from megadiff.optim.recipe import RECIPE_KEYS, Resolved, resolve_recipe
from megadiff.optim.rescale import RecipeError


def _check_layout(cfg: Config, world_size: int) -> int:
    """Model shape vs TP/PP/VPP, world size vs TP x PP (x DP), batch vs DP; returns DP."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, vpp = p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline
    groups = m.num_query_groups or m.num_attention_heads
    check(
        m.num_attention_heads % tp == 0,
        "parallel.tensor_parallel",
        f"model.num_attention_heads={m.num_attention_heads} is not divisible by TP={tp}",
    )
    check(
        groups % tp == 0,
        "parallel.tensor_parallel",
        f"query groups ({groups}) are not divisible by TP={tp}",
    )
    check(
        m.ffn_size % tp == 0,
        "parallel.tensor_parallel",
        f"ffn size {m.ffn_size} is not divisible by TP={tp}",
    )
    check(
        m.padded_vocab_size() % tp == 0,
        "parallel.tensor_parallel",
        f"padded vocab {m.padded_vocab_size()} is not divisible by TP={tp}; "
        "set model.vocab_pad_multiple to a multiple of TP",
    )
    check(
        m.num_layers % (pp * (vpp or 1)) == 0,
        "model.num_layers",
        f"{m.num_layers} layers do not split evenly over PP x VPP = {pp} x {vpp or 1}",
    )
    if m.recompute == "full":
        per_chunk = m.num_layers // (pp * (vpp or 1))
        _check_recompute_layers(m.recompute_method, m.recompute_num_layers, per_chunk)
    check(
        world_size % (tp * pp) == 0,
        "parallel",
        f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}",
    )
    dp = world_size // (tp * pp)
    if p.data_parallel is not None:
        check(
            p.data_parallel == dp,
            "parallel.data_parallel",
            f"{p.data_parallel} but world size {world_size} = TP {tp} x PP {pp} x DP {dp}",
        )
    check(
        t.global_batch % (t.micro_batch * dp) == 0,
        "train.global_batch",
        f"{t.global_batch} is not a multiple of micro_batch x DP = {t.micro_batch} x {dp}",
    )
    n_micro = t.global_batch // (t.micro_batch * dp)
    if vpp and vpp > 1:
        check(
            n_micro % pp == 0,
            "train.global_batch",
            f"interleaved pipelining needs the number of micro-batches ({n_micro}) "
            f"to be a multiple of PP={pp}",
        )
    return dp


def _check_recompute_layers(method: str, n: int, per_chunk: int) -> None:
    """``model.recompute=full``: N against the layers of one model chunk (pipeline stage)."""
    check(
        n <= per_chunk,
        "model.recompute_num_layers",
        f"{n} is more than the {per_chunk} layers per model chunk (model.num_layers / "
        f"(PP x VPP)); use 1..{per_chunk}",
    )
    check(
        method != "uniform" or per_chunk % n == 0,
        "model.recompute_num_layers",
        f"{n} does not divide the {per_chunk} layers per model chunk, as "
        "model.recompute_method=uniform needs; use a divisor, or recompute_method=block",
    )


def _check_engine(cfg: Config) -> None:
    """What ``train.engine=deepspeed`` cannot do, named by key."""
    if cfg.train.engine != "deepspeed":
        return
    p = cfg.parallel
    check(
        p.tensor_parallel == 1 and p.pipeline_parallel == 1,
        "train.engine",
        "deepspeed runs data-parallel only; set parallel.tensor_parallel=1 and "
        "parallel.pipeline_parallel=1",
    )
    check(
        not p.overlap_grad_reduce,
        "parallel.overlap_grad_reduce",
        "is megatron-core DDP's; with train.engine=deepspeed use deepspeed.overlap_comm",
    )
    check(
        not cfg.checkpoint.async_save,
        "checkpoint.async_save",
        "asynchronous saves are a megatron-core engine feature; set checkpoint.async_save=false "
        "with train.engine=deepspeed",
    )


@dataclass(frozen=True)
class Plan:
    """A validated run and the values derived from it, computed once by :func:`resolve`.

    ``cfg`` is the resolved config (``parallel.data_parallel`` and ``model.vocab_size`` filled
    in; this is what checkpoints record): read it, never change it.
    """

    cfg: Config
    n_micro: int  # micro-batches per rank per optimizer step
    tokens_per_step: int  # global_batch x seq_length
    tokens_per_run: int  # steps x tokens_per_step
    recipe: Resolved  # the configured and the physical optimizer hyper-parameters

    @property
    def dp(self) -> int:
        return self.cfg.parallel.data_parallel


def resolve(cfg: Config, world_size: int = 1, read_data: bool = True) -> Plan:
    """Check ``cfg`` against a world size and derive the run's :class:`Plan` (before any
    process group or model exists). Reads the data's vocabulary layout when ``data.source=mds``
    (``read_data=False``: trusts a given ``model.vocab_size`` instead, for planning without the
    data). ``cfg`` itself is left unchanged."""
    cfg = copy.deepcopy(cfg)
    check_sections(cfg)
    if read_data or cfg.model.vocab_size is None:
        cfg.model.vocab_size = _vocab_size(cfg)
    dp = _check_layout(cfg, world_size)
    cfg.parallel.data_parallel = dp
    _check_engine(cfg)
    t = cfg.train
    tokens_per_step = t.global_batch * cfg.model.seq_length
    tokens_per_run = t.steps * tokens_per_step
    return Plan(
        cfg=cfg,
        n_micro=t.global_batch // (t.micro_batch * dp),
        tokens_per_step=tokens_per_step,
        tokens_per_run=tokens_per_run,
        recipe=_recipe(cfg, tokens_per_run),
    )


def _recipe(cfg: Config, tokens_per_run: int) -> Resolved:
    """The physical optimizer recipe (RecipeError's argument mapped back to its config key)."""
    try:
        return resolve_recipe(cfg, tokens_per_run)
    except RecipeError as e:
        raise ConfigError(f"config key '{RECIPE_KEYS.get(e.arg, e.arg)}': {e.problem}") from e


SYNTHETIC_VOCAB = 512
# a text, an image and an audio id plus the layout's 13 specials (synthetic_layout)
SYNTHETIC_MIN_VOCAB = 16


def data_vocab_size(data: DataConfig) -> int:
    """The vocabulary size of the MDS data (``data.vocab`` or the streams' merged layouts)."""
    from megadiff.data.vocab import VocabError, resolve_layout

    try:
        layout = resolve_layout(data.vocab, [(s.name, s.path) for s in data.streams])
    except (VocabError, OSError, TypeError, KeyError, ValueError) as e:
        key = "data.vocab" if data.vocab else "data.streams"
        raise ConfigError(f"config key '{key}': no valid vocabulary layout: {e}") from e
    return layout.vocab_size


def _vocab_size(cfg: Config) -> int:
    """``model.vocab_size``, from the data's layout when the data has one."""
    m = cfg.model
    if cfg.data.source != "mds":
        size = m.vocab_size or SYNTHETIC_VOCAB
        check(
            size >= SYNTHETIC_MIN_VOCAB,
            "model.vocab_size",
            f"the synthetic data needs >= {SYNTHETIC_MIN_VOCAB} ids, got {size}",
        )
        return size
    size = data_vocab_size(cfg.data)
    if m.vocab_size is not None and m.vocab_size != size:
        raise ConfigError(
            f"config key 'model.vocab_size': {m.vocab_size} but the data's vocabulary has "
            f"{size} ids; leave model.vocab_size unset (null) to take it from the data"
        )
    return size
