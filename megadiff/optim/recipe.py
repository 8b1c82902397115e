"""The optimizer recipe a run actually uses: ``optim.*`` as given, or rescaled from a logical one.

With ``optim.logical`` set (and enabled), ``optim.lr/beta1/beta2/eps/weight_decay`` are the
*logical* values tuned at ``optim.logical.ref_batch`` sequences over ``ref_tokens`` tokens, and
the run uses :func:`megadiff.optim.rescale.rescale` of them at the physical batch
B = ``train.global_batch``, horizon D = ``train.steps`` x B x L and L = ``model.seq_length``.

Pure Python (no torch): :func:`megadiff.plan.resolve` calls :func:`resolve_recipe` once,
before any process starts, and the run's plan carries the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megadiff.optim.rescale import LogicalRecipe, OptimHParams, PhysicalRecipe, rescale

if TYPE_CHECKING:
    from megadiff.config import Config

# RecipeError.arg -> the config key that sets it (for validation messages)
RECIPE_KEYS = {
    "ref_batch": "optim.logical.ref_batch",
    "ref_tokens": "optim.logical.ref_tokens",
    "gamma": "optim.logical.gamma",
    "s_crit": "optim.logical.s_crit",
    "lr": "optim.lr",
    "beta1": "optim.beta1",
    "beta2": "optim.beta2",
    "eps": "optim.eps",
    "weight_decay": "optim.weight_decay",
    "batch": "train.global_batch",
    "tokens": "train.steps",
    "seq_len": "model.seq_length",
}


@dataclass(frozen=True)
class Resolved:
    """The configured (logical) and the physical hyper-parameters of one run."""

    configured: OptimHParams
    physical: OptimHParams
    logical: LogicalRecipe | None = None  # None: optim.* are used as given
    recipe: PhysicalRecipe | None = None

    @property
    def warnings(self) -> list[str]:
        return list(self.recipe.warnings) if self.recipe else []


def configured_hparams(cfg: Config) -> OptimHParams:
    o = cfg.optim
    return OptimHParams(o.lr, o.beta1, o.beta2, o.eps, o.weight_decay)


def resolve_recipe(cfg: Config, tokens: int) -> Resolved:
    """Apply the logical recipe, if any, at the run's horizon of ``tokens`` (the plan's
    tokens per run). Raises ``RecipeError`` (see :data:`RECIPE_KEYS`)."""
    hp = configured_hparams(cfg)
    lg = cfg.optim.logical
    if lg is None or not lg.enabled:
        return Resolved(hp, hp)
    logical = LogicalRecipe(
        ref_batch=lg.ref_batch,
        ref_tokens=tokens if lg.ref_tokens is None else lg.ref_tokens,
        lr=hp.lr,
        beta1=hp.beta1,
        beta2=hp.beta2,
        eps=hp.eps,
        weight_decay=hp.weight_decay,
        gamma=lg.gamma,
    )
    phys = rescale(logical, cfg.train.global_batch, tokens, cfg.model.seq_length, s_crit=lg.s_crit)
    return Resolved(hp, phys.hparams, logical, phys)


def report_lines(res: Resolved) -> list[str]:
    """A small start-up table: logical and physical hyper-parameters (and warnings)."""
    if res.logical is None:
        head = ["optim: hyper-parameters as configured (no optim.logical recipe)"]
        rows = [(k, _fmt(v), _fmt(v)) for k, v in vars(res.configured).items()]
    else:
        lg, ph = res.logical, res.recipe
        head = [
            f"optim: logical recipe at B0={lg.ref_batch:,} seqs, D0={lg.ref_tokens:,} tokens -> "
            f"physical B={ph.batch:,}, D={ph.tokens:,}: kappa = {ph.kappa:.6g} "
            f"(gamma {ph.gamma:g})"
        ]
        rows = [
            (k, _fmt(getattr(res.configured, k)), _fmt(getattr(res.physical, k)))
            for k in vars(res.configured)
        ]
        if ph.batch_crit is not None:
            rows.append(("batch_crit", "", _fmt(ph.batch_crit)))
    rows.insert(0, ("", "logical", "physical"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = head + [f"  {a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}" for a, b, c in rows]
    return lines + [f"WARNING: {m}" for m in res.warnings]


def _fmt(v: float) -> str:
    if isinstance(v, float) and 0 < 1 - v < 1e-4:
        return f"1 - {1 - v:.4g}"
    return f"{v:.6g}"
