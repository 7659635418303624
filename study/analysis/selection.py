"""Selection: which configurations a study's results point to (pure functions over
``trials.parquet`` rows as dicts).

A study selects on its objective (a validation metric unless the spec explicitly allows a
test metric), among *completed* trials of the *search* stage: a trial stopped early by the
scheduler never trained its whole budget, and confirmation runs are re-measurements, not
candidates. Multi-objective studies rank by their first metric here. Ties are broken by
trial id so the order is stable.
"""

from __future__ import annotations

import math
from typing import Any

Row = dict[str, Any]


def is_search(row: Row) -> bool:
    """Whether ``row`` is a search trial (rows written before stages existed are; a missing
    stage may read back as None or, through pandas, NaN)."""
    stage = row.get("stage")
    return not isinstance(stage, str) or stage == "search"


def _value(row: Row, metric: str) -> float | None:
    value = row.get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def ranked(rows: list[Row], metric: str, mode: str) -> list[Row]:
    """Completed search trials that have a value for ``metric``, best first (``mode`` max
    or min)."""
    sign = -1.0 if mode == "max" else 1.0
    found = [r for r in rows if is_search(r) and r.get("status") == "completed"
             and _value(r, metric) is not None]
    return sorted(found, key=lambda r: (sign * _value(r, metric), str(r["trial_id"])))


def best(rows: list[Row], metric: str, mode: str) -> Row | None:
    """The best completed search trial by ``metric``, or None."""
    return next(iter(ranked(rows, metric, mode)), None)


def is_baseline(row: Row) -> bool:
    """Plain DP-SGD: nothing pruned, nothing dropped."""
    return not row.get("prune_rate") and not row.get("drop_rate")


def baseline(rows: list[Row], metric: str, mode: str, trial_id: str | None = None) -> Row | None:
    """The baseline configuration to compare with, as a search row whose configuration a
    confirmation re-trains in full: the search trial ``trial_id`` if given (a ValueError if
    there is none that did not fail), else the best completed trial with prune rate 0 and
    drop rate 0, else the first such trial stopped early, else None."""
    usable = [r for r in rows if is_search(r) and r.get("status") in ("completed", "stopped")
              and r.get("params")]
    if trial_id is not None:
        found = next((r for r in usable if r["trial_id"] == trial_id), None)
        if found is None:
            known = ", ".join(sorted(r["trial_id"] for r in usable))
            raise ValueError(f"--baseline: must name a search trial that did not fail (got "
                             f"{trial_id!r}; known: {known or 'none'})")
        return found
    plain = [r for r in ranked(rows, metric, mode) if is_baseline(r)]
    stopped = sorted((r for r in usable if is_baseline(r) and r["status"] == "stopped"),
                     key=lambda r: str(r.get("finished_at") or ""))
    return next(iter(plain or stopped), None)
