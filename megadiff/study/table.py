"""Reading a study TABLE (CSV, one row per run) with validation: every bad cell or missing
column is reported as a :class:`TableError` naming the file, the row and what to do."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np


class TableError(ValueError):
    """Bad study table or fit input (exit 2)."""


def read_table(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """``(header, rows)`` of a CSV file with a header line."""
    p = Path(path)
    if not p.is_file():
        raise TableError(f"table '{path}' does not exist (give a CSV file with a header line)")
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise TableError(f"table '{path}' is empty: it needs a header line and one row per run")
    for i, r in enumerate(rows, start=1):
        if None in r:
            raise TableError(
                f"table '{path}' row {i} (line {i + 1}) has more cells than the header has "
                f"columns; fix the row or the header"
            )
    rows = [{k.strip(): (v or "").strip() for k, v in r.items()} for r in rows]
    return header, rows


def require_columns(path: str | Path, header: list[str], expected: list[str]) -> None:
    missing = [c for c in expected if c not in header]
    if missing:
        raise TableError(
            f"table '{path}' lacks column(s) {', '.join(missing)}; expected columns: "
            f"{', '.join(expected)} (it has: {', '.join(header)})"
        )


def numeric_column(
    path: str | Path, rows: list[dict[str, str]], column: str, positive: bool = True
) -> np.ndarray:
    """``column`` as floats; a non-numeric (or, with ``positive``, non-positive) cell raises,
    naming its row (1-based data row; the file line is one more for the header)."""
    values = []
    for i, row in enumerate(rows, start=1):
        text = row.get(column, "")
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (positive and value <= 0):
            need = "a positive number" if positive else "a number"
            raise TableError(
                f"table '{path}' row {i} (line {i + 1}): column '{column}' is {text!r}; it must be "
                f"{need} (fix or remove the row)"
            )
        values.append(value)
    return np.asarray(values, dtype=np.float64)


def require_points(path: str | Path, n_rows: int, n_params: int, what: str) -> None:
    if n_rows < n_params:
        raise TableError(
            f"table '{path}'{what} has {n_rows} row(s) but the fit has {n_params} parameters: "
            f"it needs at least {n_params} rows (more for useful confidence intervals)"
        )
