"""The optimizer config and lr/wd schedule shared by both engines (megatron-core, DeepSpeed)."""

from __future__ import annotations

import torch

from megadiff.config import Config
from megadiff.optim.rescale import OptimHParams
from megadiff.plan import Plan


def optimizer_config(cfg: Config, hp: OptimHParams, bf16: bool):
    """megatron-core's ``OptimizerConfig`` for AdamW with the run's physical ``hp``."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam",
        lr=hp.lr,
        min_lr=hp.lr * cfg.optim.min_lr_ratio,
        weight_decay=hp.weight_decay,
        adam_beta1=hp.beta1,
        adam_beta2=hp.beta2,
        adam_eps=hp.eps,
        clip_grad=cfg.optim.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )


def build_scheduler(plan: Plan, optimizer):
    """megatron-core's ``OptimizerParamScheduler`` counting *tokens* (its "steps" are tokens),
    so warmup/decay survive a change of batch size. Works on any optimizer whose param groups
    may carry ``max_lr``/``min_lr``/``wd_mult``; it sets every group's lr and weight decay.

    Its shape comes from the config, its progress from a checkpoint it is loaded from.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, hp = plan.cfg.optim, plan.recipe.physical
    total = plan.tokens_per_run
    style = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}[o.schedule]
    decay = o.decay_tokens if o.decay_tokens is not None else int(0.2 * total)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=hp.lr,
        min_lr=hp.lr * o.min_lr_ratio,
        lr_warmup_steps=min(o.warmup_tokens, max(total - 1, 0)),
        lr_decay_steps=total,
        lr_decay_style=style,
        start_wd=hp.weight_decay,
        end_wd=hp.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
        wsd_decay_steps=decay if o.schedule == "wsd" else None,
        lr_wsd_decay_style="cosine" if o.schedule == "wsd" else None,
    )
    scheduler.override_opt_param_scheduler = True  # config values win over a checkpoint's
    return scheduler


def param_overrides(cfg: Config, opt_config) -> dict | None:
    """megatron-core ``config_overrides`` (``ParamKey`` -> group values) for the optimizer.

    ``None`` (megatron-core's standard groups: no weight decay on norms) unless
    ``model.parameterization: completep``, which adds per-group lr/eps for hidden matrices.
    """
    if cfg.model.parameterization != "completep":
        return None
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    from megadiff.model.completep import is_hidden_matrix, multipliers

    mult = multipliers(cfg.model)
    if mult.hidden_lr == 1.0 and mult.hidden_eps == 1.0:
        # at the base width/depth: the standard groups, so the grad-norm summation order (and
        # hence every bit of the run) is the standard model's
        return None
    overrides = get_standard_config_overrides(opt_config)
    hidden = ParamWithNamePredicate(
        name="completep_hidden_matrix", fn=lambda p, name: is_hidden_matrix(name, p.dim())
    )
    overrides[ParamKey(with_name_predicate=hidden)] = {
        "max_lr": opt_config.lr * mult.hidden_lr,
        "min_lr": opt_config.min_lr * mult.hidden_lr,
        "eps": opt_config.adam_eps * mult.hidden_eps,
    }
    return overrides
