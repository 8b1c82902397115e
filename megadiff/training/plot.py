"""``megadiff plot RUN [RUN ...] --key KEY [--x step|tokens] --out FILE.png``: one
``metrics.jsonl`` key of several runs as curves on one figure (matplotlib, no display needed).

A RUN is a run directory (``run.dir``) or its ``metrics.jsonl``. Exit 2, naming the path or key,
when a run has no metrics file or no run has the key (the keys the runs do have are listed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

X_AXES = ("step", "tokens")
METRICS = "metrics.jsonl"


class PlotError(ValueError):
    """Bad ``megadiff plot`` input (exit 2)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help=f"run directory or its {METRICS}")
    p.add_argument("--key", required=True, help="metrics key to plot, e.g. loss, val_loss_image")
    p.add_argument("--x", choices=X_AXES, default="step", help="x axis (default: step)")
    p.add_argument("--out", required=True, help="image to write (.png, .pdf or .svg)")


def metrics_path(run: str | Path) -> Path:
    """``run``'s ``metrics.jsonl`` (``run`` is a run directory or the file itself)."""
    p = Path(run)
    path = p / METRICS if p.is_dir() else p
    if not p.exists():
        raise PlotError(f"run '{run}' does not exist (give a run directory or its {METRICS})")
    if not path.is_file():
        raise PlotError(f"run '{run}' has no {METRICS} (has it trained a step yet?)")
    return path


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON object lines of a ``metrics.jsonl`` (a torn or foreign line is skipped)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def numeric_keys(records: list[dict[str, Any]]) -> set[str]:
    return {k for r in records for k, v in r.items() if _number(v) and k not in X_AXES}


def curve(records: list[dict[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    """``(xs, ys)`` of the records that have a finite ``key`` and ``x``, ordered by x."""
    points = sorted((r[x], r[key]) for r in records if _number(r.get(key)) and _number(r.get(x)))
    return [p[0] for p in points], [p[1] for p in points]


def run_labels(runs: list[str | Path]) -> list[str]:
    """Legend labels: each run directory's name, the full path where names repeat."""
    dirs = [Path(r) if Path(r).is_dir() else Path(r).parent for r in runs]
    names = [d.resolve().name for d in dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, dirs, strict=True)]


def build_figure(runs: list[str | Path], key: str, x: str = "step"):
    """A matplotlib Figure with one line per run that has ``key`` (labelled by run name).
    Raises :class:`PlotError` for a missing run or a key no run has."""
    from matplotlib.figure import Figure

    if x not in X_AXES:
        raise PlotError(f"--x must be one of {', '.join(X_AXES)}, got '{x}'")
    data = [read_records(metrics_path(r)) for r in runs]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    missing = []
    for label, records in zip(run_labels(runs), data, strict=True):
        xs, ys = curve(records, key, x)
        if xs:
            ax.plot(xs, ys, label=label, marker="." if len(xs) < 50 else None)
        else:
            missing.append(label)
    if len(missing) == len(runs):
        keys = sorted(set().union(*(numeric_keys(r) for r in data)))
        raise PlotError(
            f"no run has values for --key {key}; keys these runs have: {', '.join(keys) or 'none'}"
        )
    for label in missing:
        print(f"megadiff plot: {label} has no '{key}' values; left out", file=sys.stderr)
    ax.set(xlabel=x, ylabel=key, title=key)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def check_figure_path(value: str, flag: str, error: type[Exception] = PlotError) -> Path:
    """The figure file ``flag`` names: a .png, .pdf or .svg in an existing directory (else
    ``error`` naming the flag)."""
    path = Path(value)
    if path.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise error(f"{flag} {value}: use a .png, .pdf or .svg file name")
    if not path.parent.is_dir():
        raise error(f"{flag} {value}: directory '{path.parent}' does not exist")
    return path


def run(args: argparse.Namespace) -> int:
    try:
        out = check_figure_path(args.out, "--out")
        fig = build_figure(args.runs, args.key, args.x)
    except PlotError as e:
        print(f"megadiff plot: error: {e}", file=sys.stderr)
        return 2
    fig.savefig(out, dpi=120)
    print(f"megadiff plot: wrote {out}")
    return 0
