"""SDE batch rescaling: turn a logical recipe into the physical one the hardware runs.

The user states a *logical* recipe at a reference batch B0 (sequences) and horizon D0 (tokens).
Training at a physical batch B for D tokens of sequence length L uses

    kappa = (B / B0) * (D0 / D) ** gamma
    lr -> lr * sqrt(kappa)    beta -> beta ** kappa (both betas)
    eps -> eps / sqrt(kappa)  weight_decay -> weight_decay * sqrt(kappa)
    steps = ceil(D / (L * B))

gamma = 0 is the square-root rule of Malladi et al. 2022 at a fixed horizon; gamma ~ 0.44 is a
fitted value, not a constant. kappa = 1 is the identity, and the map composes: rescaling by k1 and
then by k2 is rescaling by k1 * k2. The rule holds only below the critical batch
B_crit = D / (L * S_crit); S_crit is an estimate the user supplies, and B > B_crit gives a warning.

Pure Python on purpose (no torch): ``megadiff rescale`` must run anywhere, instantly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

# Betas are kept strictly inside (0, 1) in float64: beta ** kappa rounds to 1.0 for tiny kappa
# and underflows to 0.0 for huge kappa, so the result is clamped to the nearest representable
# floats inside the interval. This breaks exact composition only at those extremes.
BETA_MIN = math.nextafter(0.0, 1.0)  # 5e-324, the smallest positive (subnormal) double
BETA_MAX = math.nextafter(1.0, 0.0)  # 1 - 2**-53, the largest double below 1

DEFAULT_GAMMA = 0.44  # (fit)


class RecipeError(ValueError):
    """A bad rescaling input; ``arg`` names the offending argument (e.g. ``"ref_batch"``)."""

    def __init__(self, arg: str, problem: str):
        super().__init__(f"{arg} {problem}")
        self.arg = arg
        self.problem = problem


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(arg: str, value: float) -> float:
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise RecipeError(arg, f"must be a positive finite number, got {value!r}")
    return float(value)


def _count(arg: str, value: float) -> int:
    """A positive whole number (an int, or an integral float like 6.4e12)."""
    if not (_is_number(value) and math.isfinite(value) and value == int(value) and value > 0):
        raise RecipeError(arg, f"must be a positive integer, got {value!r}")
    return int(value)


def _beta(arg: str, value: float) -> float:
    if not (_is_number(value) and 0.0 < value < 1.0):
        raise RecipeError(arg, f"must be strictly between 0 and 1, got {value!r}")
    return float(value)


def _non_negative(arg: str, value: float) -> float:
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        raise RecipeError(arg, f"must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class OptimHParams:
    """The AdamW hyper-parameters that rescale with kappa."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        _beta("beta1", self.beta1)
        _beta("beta2", self.beta2)
        _positive("eps", self.eps)
        _non_negative("weight_decay", self.weight_decay)


def rescale_beta(beta: float, kappa: float) -> float:
    """beta ** kappa, clamped to [BETA_MIN, BETA_MAX] so it stays strictly inside (0, 1)."""
    return min(max(beta**kappa, BETA_MIN), BETA_MAX)


def apply_kappa(hp: OptimHParams, kappa: float) -> OptimHParams:
    """Rescale ``hp`` by ``kappa``. apply_kappa(apply_kappa(hp, k1), k2) == apply_kappa(hp, k1*k2)
    up to float rounding (and the beta clamp), and kappa = 1 returns ``hp`` unchanged."""
    kappa = _positive("kappa", kappa)
    root = math.sqrt(kappa)
    return OptimHParams(
        lr=hp.lr * root,
        beta1=rescale_beta(hp.beta1, kappa),
        beta2=rescale_beta(hp.beta2, kappa),
        eps=hp.eps / root,
        weight_decay=hp.weight_decay * root,
    )


def compute_kappa(
    ref_batch: float, ref_tokens: float, batch: float, tokens: float, gamma: float
) -> float:
    """kappa = (B / B0) * (D0 / D) ** gamma."""
    return (batch / ref_batch) * (ref_tokens / tokens) ** gamma


def num_steps(tokens: int, seq_len: int, batch: int) -> int:
    """ceil(D / (L * B)) in exact integer arithmetic: the last step may overshoot D by less than
    one batch, so the run sees at least D tokens."""
    return -(-tokens // (seq_len * batch))


def critical_batch(tokens: float, seq_len: int, s_crit: float) -> float:
    """B_crit = D / (L * S_crit), in sequences. ``s_crit`` is the user's estimate of the critical
    number of steps (below it more steps no longer help); there is no universal value."""
    return _positive("tokens", tokens) / (_count("seq_len", seq_len) * _positive("s_crit", s_crit))


@dataclass(frozen=True)
class LogicalRecipe:
    """What the user states: hyper-parameters tuned at ``ref_batch`` sequences, ``ref_tokens``."""

    ref_batch: int
    ref_tokens: int
    lr: float
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    gamma: float = DEFAULT_GAMMA

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref_batch", _count("ref_batch", self.ref_batch))
        object.__setattr__(self, "ref_tokens", _count("ref_tokens", self.ref_tokens))
        _non_negative("gamma", self.gamma)
        OptimHParams(self.lr, self.beta1, self.beta2, self.eps, self.weight_decay)  # validates

    @property
    def hparams(self) -> OptimHParams:
        return OptimHParams(self.lr, self.beta1, self.beta2, self.eps, self.weight_decay)


@dataclass(frozen=True)
class PhysicalRecipe:
    """What the trainer runs: the rescaled hyper-parameters at ``batch`` for ``tokens``."""

    kappa: float
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    steps: int
    batch: int
    tokens: int
    seq_len: int
    gamma: float = DEFAULT_GAMMA
    batch_crit: float | None = None  # None when no s_crit was given
    warnings: list[str] = field(default_factory=list)

    @property
    def hparams(self) -> OptimHParams:
        return OptimHParams(self.lr, self.beta1, self.beta2, self.eps, self.weight_decay)

    @property
    def tokens_trained(self) -> int:
        """steps * L * B: at least ``tokens``, by less than one batch."""
        return self.steps * self.seq_len * self.batch

    def as_logical(self) -> LogicalRecipe:
        """This recipe as the reference for a further rescaling (kappas multiply)."""
        return LogicalRecipe(self.batch, self.tokens, **asdict(self.hparams), gamma=self.gamma)

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_trained": self.tokens_trained}


def rescale(
    logical: LogicalRecipe, batch: int, tokens: int, seq_len: int, s_crit: float | None = None
) -> PhysicalRecipe:
    """The physical recipe for ``batch`` sequences of ``seq_len`` tokens over ``tokens`` tokens.

    ``s_crit`` (optional) is an estimate of the critical number of steps; when given and
    ``batch`` exceeds B_crit = tokens / (seq_len * s_crit) the recipe carries a warning, since the
    SDE rule is only valid below the critical batch.
    """
    batch = _count("batch", batch)
    tokens = _count("tokens", tokens)
    seq_len = _count("seq_len", seq_len)
    if tokens < seq_len * batch:
        raise RecipeError(
            "tokens",
            f"must be at least one batch (seq_len * batch = {seq_len} * {batch} = "
            f"{seq_len * batch}), got {tokens}",
        )
    if logical.ref_tokens < seq_len * logical.ref_batch:
        raise RecipeError(
            "ref_tokens",
            f"must be at least one reference batch (seq_len * ref_batch = {seq_len} * "
            f"{logical.ref_batch} = {seq_len * logical.ref_batch}), got {logical.ref_tokens}",
        )
    kappa = compute_kappa(logical.ref_batch, logical.ref_tokens, batch, tokens, logical.gamma)
    hp = apply_kappa(logical.hparams, kappa)
    warnings = []
    batch_crit = None
    if s_crit is not None:
        batch_crit = critical_batch(tokens, seq_len, s_crit)
        if batch > batch_crit:
            warnings.append(
                f"batch {batch} is above the critical batch {batch_crit:.4g} "
                f"(= tokens / (seq_len * s_crit) with s_crit = {s_crit:g}); "
                "the SDE rescaling rule is not valid there"
            )
    return PhysicalRecipe(
        kappa=kappa,
        **asdict(hp),
        steps=num_steps(tokens, seq_len, batch),
        batch=batch,
        tokens=tokens,
        seq_len=seq_len,
        gamma=logical.gamma,
        batch_crit=batch_crit,
        warnings=warnings,
    )
