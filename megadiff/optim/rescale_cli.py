"""``megadiff rescale``: print the physical recipe for a logical one (SDE rule).

    megadiff rescale --ref-batch 256 --ref-tokens 100B --batch 1024 --tokens 400B \\
        --seq-len 2048 --lr 3e-4 [--json]

Without ``--ref-tokens`` the reference horizon is the physical one (D0 = D, the batch-only rule
kappa = B/B0), as for ``optim.logical.ref_tokens: null``; one of the two horizons is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from decimal import Decimal, InvalidOperation

from megadiff.optim.rescale import (
    DEFAULT_GAMMA,
    LogicalRecipe,
    PhysicalRecipe,
    RecipeError,
    num_steps,
    rescale,
)

_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
# library argument name -> flag, for error messages
_FLAGS = {
    a: "--" + a.replace("_", "-")
    for a in (
        *("ref_batch", "ref_tokens", "batch", "tokens", "seq_len", "s_crit", "gamma"),
        *("lr", "beta1", "beta2", "eps", "weight_decay"),
    )
}


def count(text: str) -> int:
    """A whole number: ``4096``, ``6.4e12``, ``1_000_000`` or with a suffix ``100B``, ``6.4T``
    (K=1e3, M=1e6, B/G=1e9, T=1e12). Range checks are left to the library."""
    s = text.strip().replace("_", "")
    scale = _SUFFIX.get(s[-1:].lower(), 1)
    if scale != 1:
        s = s[:-1]
    try:
        value = Decimal(s) * scale
        if value.is_finite() and value == value.to_integral_value():
            return int(value)
    except InvalidOperation:
        pass
    raise argparse.ArgumentTypeError(
        f"expected a whole number such as 4096, 6.4e12 or 100B, got {text!r}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logical recipe (what the hyper-parameters were tuned at)")
    g.add_argument("--ref-batch", type=count, required=True, metavar="B0", help="sequences")
    g.add_argument(
        "--ref-tokens",
        type=count,
        metavar="D0",
        help="tokens, e.g. 5e10 or 50B (default: D, the batch-only rule kappa = B/B0)",
    )
    g.add_argument("--lr", type=float, required=True, help="peak learning rate at (B0, D0)")
    g.add_argument("--beta1", type=float, default=0.9, help="Adam beta1 (default 0.9)")
    g.add_argument("--beta2", type=float, default=0.95, help="Adam beta2 (default 0.95)")
    g.add_argument("--eps", type=float, default=1e-8, help="Adam epsilon (default 1e-8)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="weight decay (default 0.1)")
    p = parser.add_argument_group("physical run")
    p.add_argument("--batch", type=count, required=True, metavar="B", help="sequences")
    p.add_argument(
        "--tokens", type=count, metavar="D", help="tokens (default: D0; one of the two is needed)"
    )
    p.add_argument("--seq-len", type=count, required=True, metavar="L", help="tokens")
    r = parser.add_argument_group("rule")
    r.add_argument(
        "--gamma",
        type=float,
        default=DEFAULT_GAMMA,
        help=f"horizon exponent, a fitted value (default {DEFAULT_GAMMA}; 0 = square-root rule)",
    )
    r.add_argument(
        "--s-crit",
        type=float,
        default=None,
        metavar="S",
        help="estimated critical number of steps; warns when B > D / (L * S) (default: no check)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")


def _fmt(value: object) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.6g}"


def _fmt_beta(beta: float) -> str:
    # 0.9999999 would print as "1" with 6 significant digits
    return f"1 - {1 - beta:.4g}" if 1 - beta < 1e-4 else f"{beta:.6g}"


def format_table(logical: LogicalRecipe, phys: PhysicalRecipe) -> str:
    ratio = phys.batch / logical.ref_batch
    horizon = phys.kappa / ratio
    ref_steps = num_steps(logical.ref_tokens, phys.seq_len, logical.ref_batch)
    rows = [
        ("", "logical", "physical"),
        ("batch", _fmt(logical.ref_batch), _fmt(phys.batch)),
        ("tokens", _fmt(logical.ref_tokens), _fmt(phys.tokens)),
        ("seq_len", _fmt(phys.seq_len), _fmt(phys.seq_len)),
        ("kappa", "1", _fmt(phys.kappa)),
        ("lr", _fmt(logical.lr), _fmt(phys.lr)),
        ("beta1", _fmt_beta(logical.beta1), _fmt_beta(phys.beta1)),
        ("beta2", _fmt_beta(logical.beta2), _fmt_beta(phys.beta2)),
        ("eps", _fmt(logical.eps), _fmt(phys.eps)),
        ("weight_decay", _fmt(logical.weight_decay), _fmt(phys.weight_decay)),
        ("steps", _fmt(ref_steps), _fmt(phys.steps)),
    ]
    if phys.batch_crit is not None:
        rows.append(("batch_crit", "", _fmt(phys.batch_crit)))
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    kappa = f"kappa = (B/B0) * (D0/D)^gamma = {ratio:.6g} * {horizon:.6g} = {phys.kappa:.6g}"
    lines = [f"{kappa}  (gamma = {phys.gamma:g})", ""]
    lines += [f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}" for a, b, c in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.tokens is None and args.ref_tokens is None:
        print(
            "megadiff rescale: error: give the run's horizon --tokens D (the reference horizon "
            "D0 is then D: the batch-only rule) or the reference horizon --ref-tokens D0",
            file=sys.stderr,
        )
        return 2
    tokens = args.ref_tokens if args.tokens is None else args.tokens
    ref_tokens = tokens if args.ref_tokens is None else args.ref_tokens
    try:
        logical = LogicalRecipe(
            ref_batch=args.ref_batch,
            ref_tokens=ref_tokens,
            lr=args.lr,
            beta1=args.beta1,
            beta2=args.beta2,
            eps=args.eps,
            weight_decay=args.weight_decay,
            gamma=args.gamma,
        )
        phys = rescale(logical, args.batch, tokens, args.seq_len, s_crit=args.s_crit)
    except RecipeError as e:
        where = f"argument {_FLAGS[e.arg]}: {e.problem}" if e.arg in _FLAGS else str(e)
        print(f"megadiff rescale: error: {where}", file=sys.stderr)
        return 2
    for w in phys.warnings:
        print(f"megadiff rescale: warning: {w}", file=sys.stderr)
    if args.json:
        logical_steps = num_steps(logical.ref_tokens, phys.seq_len, logical.ref_batch)
        out = {**phys.to_dict(), "logical": {**asdict(logical), "steps": logical_steps}}
        print(json.dumps(out, indent=2))
    else:
        print(format_table(logical, phys))
    return 0
