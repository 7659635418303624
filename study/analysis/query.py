"""Filters, sorting, Pareto fronts and formatting over a study's results tables.

Pure functions: they take a pyarrow Table or a pandas DataFrame (see
:func:`to_frame`) and return a new pandas DataFrame; nothing is modified in place.
Column names may be given by alias (``accuracy`` for ``test_accuracy``, ...).
"""

from __future__ import annotations

import difflib
import json
import operator
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

OPS = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le,
       ">": operator.gt, "<": operator.lt}
FORMATS = ("table", "csv", "json")

# In filters (and column selection / sorting) ``epsilon`` means the *target* budget and
# ``accuracy`` the reported test accuracy.
FILTER_ALIASES = {"epsilon": "epsilon_target", "eps": "epsilon_target",
                  "accuracy": "test_accuracy", "acc": "test_accuracy", "loss": "test_loss",
                  "val": "val_accuracy", "cost": "wall_time_s", "time": "wall_time_s",
                  "lr": "learning_rate"}
# In Pareto specs an alias also carries its direction; ``epsilon`` is what was *spent*. A
# front *selects* configurations, so ``accuracy`` is the validation accuracy there (name
# ``test_accuracy`` explicitly to see the test front).
PARETO_ALIASES = {"accuracy": ("val_accuracy", "max"), "acc": ("val_accuracy", "max"),
                  "val": ("val_accuracy", "max"),
                  "density": ("density", "min"), "epsilon": ("epsilon_spent", "min"),
                  "eps": ("epsilon_spent", "min"), "cost": ("wall_time_s", "min"),
                  "time": ("wall_time_s", "min"), "loss": ("test_loss", "min")}
_DEFAULT_DIRECTION = {"test_accuracy": "max", "best_test_accuracy": "max",
                      "best_val_accuracy": "max", "val_loss": "min", "samples_per_s": "max",
                      "epsilon_target": "min", **dict(PARETO_ALIASES.values())}

_FILTER_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(==|!=|>=|<=|>|<)\s*(\S.*?)\s*$")
_NUMBER_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class Filter:
    """One ``<column><op><value>`` condition; ``text`` is the value as written."""

    column: str
    op: str
    value: float | int | str
    text: str

    def __str__(self) -> str:
        return f"{self.column}{self.op}{self.text}"


def parse_filter(expr: str) -> Filter:
    """Parse ``"prune_rate>0.5"``-style text; numbers become int/float, the rest strings."""
    match = _FILTER_RE.match(expr)
    if not match:
        raise ValueError(f"bad filter {expr!r}: expected <column><op><value> with op one of "
                         f"{' '.join(OPS)} (e.g. 'epsilon==3', 'status!=failed')")
    column, op, text = match.groups()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return Filter(column, op, text[1:-1], text[1:-1])
    value: float | int | str = text
    if _NUMBER_RE.match(text):
        value = float(text) if any(c in text for c in ".eE") else int(text)
    return Filter(column, op, value, text)


def to_frame(data: pd.DataFrame | pa.Table) -> pd.DataFrame:
    """A pandas DataFrame of ``data``; int64 columns keep integers (nullable ``Int64``)."""
    if isinstance(data, pa.Table):
        return data.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    return data


def resolve_column(df: pd.DataFrame, name: str, aliases: dict[str, str] = FILTER_ALIASES, *,
                   context: str) -> str:
    """The column ``name`` refers to (itself or its alias), else a did-you-mean ValueError
    naming where it was given (``context``)."""
    if name in df.columns:
        return name
    if name in aliases and aliases[name] in df.columns:
        return aliases[name]
    known = [str(c) for c in df.columns]
    hint = difflib.get_close_matches(name, known + list(aliases), n=1)
    mean = f"; did you mean {hint[0]!r}?" if hint else ""
    raise ValueError(f"unknown column {name!r} in {context}{mean} available columns: "
                     f"{', '.join(known)}")


def _operand(series: pd.Series, f: Filter, column: str) -> Any:
    """The filter value converted to something ``series`` can be compared with."""
    if pd.api.types.is_datetime64_any_dtype(series):
        try:
            value = pd.Timestamp(f.text)
        except ValueError:
            raise ValueError(f"filter {str(f)!r}: {f.text!r} is not a timestamp") from None
        tz = series.dt.tz
        return value.tz_localize(tz) if value.tzinfo is None and tz is not None else value
    if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
        return f.text
    if isinstance(f.value, str):
        raise ValueError(f"filter {str(f)!r}: column {column!r} is numeric but "
                         f"{f.text!r} is not a number")
    return f.value


def apply_filters(df: pd.DataFrame | pa.Table, filters: list[Filter]) -> pd.DataFrame:
    """Rows matching every filter (null values match ``!=`` only)."""
    df = to_frame(df)
    keep = pd.Series(True, index=df.index)
    for f in filters:
        column = resolve_column(df, f.column, context=f"filter {str(f)!r}")
        try:
            mask = OPS[f.op](df[column], _operand(df[column], f, column))
        except TypeError as err:
            raise ValueError(f"filter {str(f)!r}: cannot compare column {column!r}: "
                             f"{err}") from None
        keep &= mask.fillna(f.op == "!=").astype(bool)
    return df[keep]


def select_columns(df: pd.DataFrame | pa.Table, columns: list[str] | None) -> pd.DataFrame:
    """Only ``columns`` (aliases allowed, in the given order); all of them when None."""
    df = to_frame(df)
    if not columns:
        return df
    names = [resolve_column(df, c, context="column selection") for c in columns]
    return df[list(dict.fromkeys(names))]


def default_columns(df: pd.DataFrame | pa.Table, also: list[str] | None = None) -> list[str]:
    """What ``dpstudy query`` shows unless ``--columns`` says otherwise: trial id, stage and
    status, the searched parameters (the keys of the ``params`` JSON column), the objective
    metric(s) (``selection_metric``) with the test accuracy, the epsilon spent and budget used,
    then ``also`` (sort keys, Pareto objectives). Columns the table lacks are left out; a
    table without ``params`` (the epochs table) shows every column."""
    df = to_frame(df)
    if "params" not in df.columns:
        return [str(c) for c in df.columns]
    searched = [k for text in df["params"].dropna() for k in json.loads(text)]
    metrics = [m for text in df.get("selection_metric", pd.Series()).dropna()
               for m in text.split(",")]
    names = ["trial_id", "stage", "status", *searched, *metrics, "test_accuracy",
             "epsilon_spent", "budget_used"]
    extra = [resolve_column(df, c.lstrip("-"), context="columns") for c in also or []]
    return [c for c in dict.fromkeys([*names, *extra]) if c in df.columns]


def sort(df: pd.DataFrame | pa.Table, by: list[str], descending: bool = False) -> pd.DataFrame:
    """Stable sort by ``by``; a ``-col`` item sorts that column descending. Nulls last."""
    df = to_frame(df)
    names = [resolve_column(df, item.lstrip("-"), context="sort keys") for item in by]
    ascending = [not (descending or item.startswith("-")) for item in by]
    return df.sort_values(names, ascending=ascending, kind="mergesort", na_position="last")


def parse_pareto(spec: str) -> list[tuple[str, str]]:
    """``"accuracy,density"`` -> ``[("val_accuracy", "max"), ("density", "min")]``.

    Items are aliases (see ``PARETO_ALIASES``), ``col:max`` / ``col:min``, or a column with
    a known direction (``test_accuracy``, ``wall_time_s``, ...).
    """
    objectives: list[tuple[str, str]] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, direction = (s.strip() for s in item.partition(":"))
        column, known = PARETO_ALIASES.get(name, (name, _DEFAULT_DIRECTION.get(name, "")))
        direction = direction or known
        if direction not in ("max", "min"):
            raise ValueError(f"bad Pareto objective {item!r} in {spec!r}: write "
                             f"'<column>:max' or '<column>:min' or one of "
                             f"{', '.join(PARETO_ALIASES)}")
        if any(column == c for c, _ in objectives):
            raise ValueError(f"Pareto objective {column!r} given twice in {spec!r}")
        objectives.append((column, direction))
    if not objectives:
        raise ValueError(f"empty Pareto spec {spec!r}: expected e.g. 'accuracy,density'")
    return objectives


def pareto_front(df: pd.DataFrame | pa.Table, objectives: list[tuple[str, str]]
                 ) -> pd.DataFrame:
    """Non-dominated completed rows for ``objectives`` (one or more (column, "max"|"min")).

    Rows whose ``status`` is not ``completed`` (stopped early by the scheduler, failed) or
    that have a null objective never enter the front; exact ties are all kept. The result
    is sorted best-first by the first objective, then by the next ones.
    """
    df = to_frame(df)
    columns = [resolve_column(df, c, aliases={}, context="Pareto objectives")
               for c, _ in objectives]
    for (name, direction), column in zip(objectives, columns, strict=True):
        if direction not in ("max", "min"):
            raise ValueError(f"objective {name!r}: direction must be 'max' or 'min', "
                             f"got {direction!r}")
        if not pd.api.types.is_numeric_dtype(df[column]):
            raise ValueError(f"objective {name!r}: column {column!r} is not numeric")
    if "status" in df.columns:
        df = df[df["status"] == "completed"]
    df = df.dropna(subset=columns)
    signs = np.array([1.0 if d == "max" else -1.0 for _, d in objectives])
    values = df[columns].to_numpy(dtype=float, na_value=np.nan) * signs
    # [i, j]: row j is at least as good as row i on every objective, and better on one
    at_least = (values[None, :, :] >= values[:, None, :]).all(axis=2)
    better = (values[None, :, :] > values[:, None, :]).any(axis=2)
    front = df[~(at_least & better).any(axis=1)]
    ascending = [d == "min" for _, d in objectives]
    return front.sort_values(columns, ascending=ascending, kind="mergesort")


def _cell(value: Any) -> str:
    if pd.isna(value):  # None, NaN, pd.NA, NaT
        return "-"
    if isinstance(value, float):
        text = f"{value:.4g}"
        return f"{float(text):.0f}" if "e+" in text and abs(value) < 1e15 else text
    if isinstance(value, pd.Timestamp):
        return value.isoformat(timespec="seconds")
    return str(value)


def _json_value(value: Any) -> Any:
    if pd.isna(value):
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return value.item() if isinstance(value, np.generic) else value


def _plain_table(df: pd.DataFrame) -> str:
    columns = [str(c) for c in df.columns]
    cells = [[_cell(v) for v in df[c].tolist()] for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    widths = [max([len(name), *map(len, col)]) for name, col in zip(columns, cells, strict=True)]

    def line(items: list[str]) -> str:
        parts = [s.rjust(w) if num else s.ljust(w)
                 for s, w, num in zip(items, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    rows = [line(list(r)) for r in zip(*cells, strict=True)] if cells else []
    return "\n".join([line(columns), line(["-" * w for w in widths]), *rows]) + "\n"


def format_table(df: pd.DataFrame | pa.Table, fmt: str) -> str:
    """Render rows as ``table`` (aligned text, floats to 4 significant digits), ``csv`` or
    ``json`` (a list of records; nulls -> null, timestamps -> ISO 8601)."""
    df = to_frame(df)
    if fmt == "table":
        return _plain_table(df)
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        records = [{str(k): _json_value(v) for k, v in row.items()}
                   for row in df.to_dict("records")]
        return json.dumps(records, indent=2) + "\n"
    raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
