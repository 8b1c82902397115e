"""``megadiff sweep collect DIR``: one row per finished point, as CSV and JSONL, with the columns
``megadiff fit scaling|mixing`` read.

Columns: ``name``, the axis values (one column per dotted key), ``params`` (non-embedding),
``params_total``, ``tokens`` (trained at the final held-out evaluation), ``flops``, ``step``,
``loss`` (final val loss), ``best_val_loss``, ``val_loss_<modality>``, ``val_loss_stream_<name>``
(final), ``p_<stream>`` (the mixture's shares of rows, summing to 1). A point without a held-out
evaluation (not run yet, or ``eval.every=0``) is left out and named.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from megadiff.study.sweep import Point, read_sweep

FIXED = ["name", "params", "params_total", "tokens", "flops", "step", "loss", "best_val_loss"]


def val_records(run_dir: Path) -> list[dict[str, Any]]:
    """The held-out evaluation records of a run's ``metrics.jsonl`` (finite ``val_loss``)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        if isinstance(record, dict) and isinstance(record.get("val_loss"), (int, float)):
            out.append(record)
    return out


def point_row(point: Point, run_dir: Path) -> dict[str, Any] | None:
    """The point's table row, or None without a held-out evaluation."""
    records = val_records(run_dir)
    if not records:
        return None
    final = records[-1]
    tokens = int(final.get("tokens") or point.tokens)
    row: dict[str, Any] = {"name": point.name, **point.overrides}
    row.update(
        params=point.params,
        params_total=point.params_total,
        tokens=tokens,
        flops=_flops(point, tokens),
        step=final.get("step"),
        loss=final["val_loss"],
        best_val_loss=min(r["val_loss"] for r in records),
    )
    row.update({k: v for k, v in final.items() if k.startswith("val_loss_") and v is not None})
    row.update({f"p_{name}": share for name, share in point.proportions.items()})
    return row


def _flops(point: Point, tokens: int) -> int:
    """The point's FLOPs scaled to the tokens actually trained."""
    if not point.tokens:
        return point.flops
    return round(point.flops * tokens / point.tokens)


def collect(sweep_dir: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """``(rows, missing)``: the finished points' rows and the names of those without one."""
    sweep_dir = Path(sweep_dir)
    rows, missing = [], []
    for point in read_sweep(sweep_dir):
        row = point_row(point, point.directory(sweep_dir))
        if row is None:
            missing.append(point.name)
        else:
            rows.append(row)
    return rows, missing


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The fixed columns, then the axes, the losses and the proportions, in first-seen order."""
    seen: list[str] = []
    for row in rows:
        seen += [k for k in row if k not in seen and k not in FIXED]
    losses = [k for k in seen if k.startswith("val_loss_")]
    shares = [k for k in seen if k.startswith("p_")]
    axes = [k for k in seen if k not in losses and k not in shares]
    return [FIXED[0], *axes, *FIXED[1:], *losses, *shares]


def write_tables(rows: list[dict[str, Any]], csv_path: Path, jsonl_path: Path) -> None:
    header = columns(rows)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    with open(jsonl_path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value
