"""Checked numeric command-line flags: an argparse ``type=`` per allowed range.

``--temperature nan`` or ``--gen-length -5`` then fail in argparse itself, naming the flag
(``argument --gen-length: must be >= 1, got -5``) with exit code 2, before any checkpoint is
read. The ranges are :class:`~megadiff.config.Range`, as for config keys.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from megadiff.config import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Range

__all__ = ["AT_LEAST_1", "NON_NEGATIVE", "POSITIVE", "HelpFormatter", "number"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default, when it has one (not for None, false or empty
    defaults, nor when the help text already says ``%(default)s``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        d = action.default
        if d is None or d is False or d == [] or d == "" or d == argparse.SUPPRESS:
            return help_
        if action.required:
            return help_
        return super()._get_help_string(action)


def number(kind: type[int] | type[float], rng: Range | None = None) -> Callable[[str], float]:
    """An argparse ``type=`` that parses ``kind`` and refuses NaN, infinities and values
    outside ``rng``."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if rng is not None and not rng.contains(value):
            raise argparse.ArgumentTypeError(f"must be {rng.describe()}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse
