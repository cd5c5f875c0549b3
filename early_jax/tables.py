"""Result tables: CSV files of row dicts, grouping rows, and the statistics over seeds.

Every table and figure summarises seeds the same way (`Stat`): the mean, the sample standard
deviation (ddof=1; 0 for one seed) and the standard error of the mean. Rows whose `diverged` flag
is set are never averaged in (see `finite_rows`).
"""
from __future__ import annotations

import csv
import dataclasses
import math
from collections import defaultdict

import numpy as np

from early_jax import files


@dataclasses.dataclass(frozen=True)
class Stat:
    mean: float
    std: float     # sample std over seeds (ddof=1), 0 for a single value
    n: int

    @property
    def sem(self) -> float:
        return self.std / math.sqrt(self.n) if self.n else math.nan

    def text(self, scale: float = 100.0, digits: int = 2) -> str:
        """'90.31 ± 0.05' (or just the mean for one value), scaled (default: fraction -> %)."""
        if not self.n:
            return "n/a"
        mean = f"{scale * self.mean:.{digits}f}"
        return f"{mean} ± {scale * self.std:.{digits}f}" if self.n > 1 else mean


def stat(values) -> Stat:
    """Statistics of the finite values (NaN marks a missing or diverged entry)."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    n = len(values)
    if not n:
        return Stat(math.nan, math.nan, 0)
    return Stat(float(values.mean()), float(values.std(ddof=1)) if n > 1 else 0.0, n)


def finite_rows(rows: list[dict]) -> list[dict]:
    """Rows of seeds that trained to the end (a diverged seed is shown, never averaged)."""
    return [r for r in rows if not r.get("diverged")]


def group_rows(rows: list[dict], keys: tuple) -> dict[tuple, list[dict]]:
    """{(row[k] for k in keys): [row, ...]} over `finite_rows`, sorted by key."""
    cells = defaultdict(list)
    for row in finite_rows(rows):
        cells[tuple(row[k] for k in keys)].append(row)
    order = lambda item: [(0, x) if isinstance(x, (int, float)) else (1, str(x)) for x in item[0]]
    return dict(sorted(cells.items(), key=order))


def group(rows: list[dict], keys: tuple, value: str) -> dict[tuple, list]:
    """{(row[k] for k in keys): [row[value], ...]} over `finite_rows`, sorted by key."""
    return {key: [r.get(value, math.nan) for r in cell] for key, cell in group_rows(rows, keys).items()}


def summarize(rows: list[dict], keys: tuple, value: str) -> dict[tuple, Stat]:
    return {key: stat(values) for key, values in group(rows, keys, value).items()}


def write_csv(rows: list[dict], path: str) -> str:
    """Every column of every row (rows may differ in columns); atomic."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    if files.is_primary():
        with files.atomic(path) as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return path


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)
