"""Tests of study.analysis.query: filters, column selection, sorting, Pareto fronts, formats."""

from __future__ import annotations

import datetime as dt
import io
import json
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from study.analysis.query import (
    Filter,
    apply_filters,
    default_columns,
    format_table,
    pareto_front,
    parse_filter,
    parse_pareto,
    select_columns,
    sort,
)
from study.storage.schema import TRIALS_SCHEMA

# id, status, epsilon_target, prune_rate, density, test_accuracy, criterion, wall_time_s
ROWS = [
    ("t01", "completed", 3, 0.0, 1.0, 0.95, "random", 100.0),
    ("t02", "completed", 3, 0.5, 0.5, 0.93, "magnitude", 80.0),
    ("t03", "completed", 3, 0.9, 0.1, 0.85, "snip", 60.0),
    ("t04", "completed", 8, 0.5, 0.5, 0.90, "magnitude", 70.0),  # dominated by t02
    ("t05", "completed", 8, 0.7, 0.3, 0.91, "random", 65.0),
    ("t06", "stopped", 3, 0.9, 0.1, 0.97, "snip", 20.0),  # would dominate, but not complete
    ("t07", "failed", 8, 0.95, 0.05, None, "magnitude", 5.0),
    ("t08", "completed", 1, 0.7, 0.3, 0.91, "magnitude", 12345.678),  # ties t05
    ("t09", "completed", 1, 0.3, 0.7, 0.80, "random", 50.0),  # dominated by t02
    ("t10", "completed", 8, 0.9, None, 0.99, "snip", 400.0),  # no density: never on the front
]
FRONT = ["t01", "t02", "t05", "t08", "t03"]


@pytest.fixture()
def table() -> pa.Table:
    keys = ("trial_id", "status", "epsilon_target", "prune_rate", "density", "test_accuracy",
            "pruning_criterion", "wall_time_s")
    rows = [dict(zip(keys, r, strict=True)) for r in ROWS]
    for i, row in enumerate(rows):
        row.update(study="q", steps=100 * (i + 1),
                   finished_at=dt.datetime(2024, 5, 1, i, tzinfo=dt.timezone.utc))
    rows[6]["error"] = "CUDA out of memory"
    for row in rows:  # validation agrees with test here; see the disagreement test below
        row["val_accuracy"] = row["test_accuracy"]
    return pa.Table.from_pylist(rows, schema=TRIALS_SCHEMA)


def ids(df: pd.DataFrame) -> list[str]:
    return list(df["trial_id"])


def run_filters(table: pa.Table, *exprs: str) -> list[str]:
    return ids(apply_filters(table, [parse_filter(e) for e in exprs]))


def test_parse_filter_values() -> None:
    assert parse_filter("epsilon==3") == Filter("epsilon", "==", 3, "3")
    assert parse_filter(" learning_rate <= 1e-3 ").value == pytest.approx(0.001)
    assert parse_filter("prune_rate>0.5").op == ">"
    assert parse_filter("status!=failed").value == "failed"
    assert parse_filter("seed=='7'").value == "7"
    assert parse_filter("drop_rate>=-.5").value == -0.5


@pytest.mark.parametrize("expr", ["prune_rate=0.5", "==3", "prune_rate>", "prune rate>1",
                                  "accuracy~0.9", ""])
def test_bad_filter_message(expr: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_filter(expr)
    message = str(err.value)
    assert repr(expr) in message
    assert "expected <column><op><value>" in message and "==" in message and "<=" in message


def test_filters(table: pa.Table) -> None:
    assert run_filters(table, "epsilon==3") == ["t01", "t02", "t03", "t06"]
    assert run_filters(table, "prune_rate>0.5") == ["t03", "t05", "t06", "t07", "t08", "t10"]
    assert run_filters(table, "pruning_criterion==random") == ["t01", "t05", "t09"]
    assert run_filters(table, "status!=failed") == [r[0] for r in ROWS if r[1] != "failed"]
    assert run_filters(table, "epsilon==8", "prune_rate>=0.5") == ["t04", "t05", "t07", "t10"]
    assert run_filters(table, "accuracy>=0.95") == ["t01", "t06", "t10"]
    assert run_filters(table, "steps<300", "trial_id!=t01") == ["t02"]
    assert run_filters(table, "finished_at>=2024-05-01T08:00") == ["t09", "t10"]


def test_filters_on_nulls(table: pa.Table) -> None:
    assert run_filters(table, "density<0.2") == ["t03", "t06", "t07"]
    assert len(run_filters(table, "error!=CUDA out of memory")) == 9
    assert run_filters(table, "error==CUDA out of memory") == ["t07"]
    assert len(run_filters(table, "seed!=3")) == 10 and run_filters(table, "seed>=0") == []


def test_filters_accept_pandas(table: pa.Table) -> None:
    df = pd.read_parquet(io.BytesIO(_parquet_bytes(table)))
    assert ids(apply_filters(df, [parse_filter("epsilon==3")])) == ["t01", "t02", "t03", "t06"]


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def test_unknown_column_message(table: pa.Table) -> None:
    with pytest.raises(ValueError) as err:
        apply_filters(table, [parse_filter("prune_rat>0.5")])
    message = str(err.value)
    assert "'prune_rat'" in message and "did you mean 'prune_rate'" in message
    assert "available columns:" in message and "drop_rate" in message
    with pytest.raises(ValueError, match="unknown column 'acuracy'.*available columns"):
        select_columns(table, ["trial_id", "acuracy"])


def test_type_mismatch_message(table: pa.Table) -> None:
    with pytest.raises(ValueError, match="prune_rate.*numeric.*'high'"):
        apply_filters(table, [parse_filter("prune_rate>high")])


def test_select_columns(table: pa.Table) -> None:
    df = select_columns(table, ["trial_id", "accuracy", "epsilon"])
    assert list(df.columns) == ["trial_id", "test_accuracy", "epsilon_target"]
    assert len(select_columns(table, None).columns) == len(TRIALS_SCHEMA)


def test_sort(table: pa.Table) -> None:
    assert ids(sort(table, ["wall_time_s"]))[:3] == ["t07", "t06", "t09"]
    assert ids(sort(table, ["wall_time_s"], descending=True))[:3] == ["t08", "t10", "t01"]
    by_acc = ids(sort(table, ["-accuracy"]))
    assert by_acc[:3] == ["t10", "t06", "t01"] and by_acc[-1] == "t07"  # null last
    assert ids(sort(table, ["test_accuracy"]))[-1] == "t07"
    assert ids(sort(table, ["epsilon", "-prune_rate"])) == [
        "t08", "t09", "t03", "t06", "t02", "t01", "t07", "t10", "t05", "t04"]


def test_parse_pareto() -> None:
    assert parse_pareto("accuracy,density") == [("val_accuracy", "max"), ("density", "min")]
    assert parse_pareto("test_accuracy,val") == [("test_accuracy", "max"),
                                                 ("val_accuracy", "max")]
    assert parse_pareto("epsilon, cost") == [("epsilon_spent", "min"), ("wall_time_s", "min")]
    assert parse_pareto("time,loss") == [("wall_time_s", "min"), ("test_loss", "min")]
    assert parse_pareto("samples_per_s:max,epsilon:max") == [
        ("samples_per_s", "max"), ("epsilon_spent", "max")]
    assert parse_pareto("test_accuracy") == [("test_accuracy", "max")]
    for bad in ("", "prune_rate", "accuracy:up", "accuracy,accuracy"):
        with pytest.raises(ValueError):
            parse_pareto(bad)


def test_pareto_front_accuracy_density(table: pa.Table) -> None:
    front = pareto_front(table, parse_pareto("accuracy,density"))
    assert ids(front) == FRONT
    assert "t06" not in ids(front)  # stopped by ASHA: excluded although it dominates
    assert "t10" not in ids(front)  # NaN objective


def test_pareto_accuracy_selects_on_validation_not_test(table: pa.Table) -> None:
    df = table.to_pandas()
    df.loc[df.trial_id == "t01", "val_accuracy"] = 0.50  # best on test, poor on validation
    front = ids(pareto_front(df, parse_pareto("accuracy,density")))
    assert "t01" not in front and "t02" in front
    assert "t01" in ids(pareto_front(df, parse_pareto("test_accuracy,density")))


def test_pareto_front_without_status_column(table: pa.Table) -> None:
    df = table.to_pandas().drop(columns=["status"])
    front = pareto_front(df, [("test_accuracy", "max"), ("density", "min")])
    assert ids(front) == ["t06"]


def test_pareto_front_single_and_min(table: pa.Table) -> None:
    assert ids(pareto_front(table, [("wall_time_s", "min")])) == ["t09"]
    front = pareto_front(table, [("test_accuracy", "max"), ("wall_time_s", "min")])
    assert ids(front) == ["t10", "t01", "t02", "t05", "t03", "t09"]
    with pytest.raises(ValueError, match="unknown column 'acc_x'"):
        pareto_front(table, [("acc_x", "max")])
    with pytest.raises(ValueError, match="direction"):
        pareto_front(table, [("density", "lowest")])


def test_format_csv_parses_back(table: pa.Table) -> None:
    df = select_columns(table, ["trial_id", "status", "test_accuracy", "steps", "error"])
    back = pd.read_csv(io.StringIO(format_table(df, "csv")))
    assert list(back.columns) == list(df.columns)
    assert list(back.trial_id) == ids(df)
    assert back.test_accuracy.tolist()[:6] == [r[5] for r in ROWS][:6]
    assert math.isnan(back.test_accuracy[6]) and back.steps.tolist()[-1] == 1000


def test_format_json_parses_back(table: pa.Table) -> None:
    records = json.loads(format_table(table, "json"))
    assert len(records) == len(ROWS) and set(records[0]) == set(TRIALS_SCHEMA.names)
    assert records[1]["trial_id"] == "t02" and records[1]["test_accuracy"] == 0.93
    assert records[6]["test_accuracy"] is None and records[0]["clip_norm"] is None
    assert records[2]["steps"] == 300 and isinstance(records[2]["steps"], int)
    assert pd.Timestamp(records[3]["finished_at"]) == pd.Timestamp("2024-05-01T03:00Z")


def test_format_table_aligned(table: pa.Table) -> None:
    df = select_columns(table, ["trial_id", "pruning_criterion", "wall_time_s", "accuracy"])
    lines = format_table(df, "table").splitlines()
    assert lines[0].split() == ["trial_id", "pruning_criterion", "wall_time_s", "test_accuracy"]
    assert set(lines[1].replace(" ", "")) == {"-"} and len(lines) == len(ROWS) + 2
    assert lines[2].split() == ["t01", "random", "100", "0.95"]
    assert lines[9].split() == ["t08", "magnitude", "12350", "0.91"]
    assert lines[8].split()[-1] == "-"  # null accuracy of the failed trial
    ends = {len(line) for line in lines[2:]}
    assert ends == {len(lines[0])}  # right-aligned numbers end in the same column
    assert format_table(pd.DataFrame({"x": [1 / 3]}), "table").splitlines()[2].strip() == "0.3333"


def test_format_unknown(table: pa.Table) -> None:
    with pytest.raises(ValueError, match="table, csv, json"):
        format_table(table, "xml")


def test_default_columns_follow_the_study() -> None:
    rows = [{"study": "q", "trial_id": f"t{i}", "status": "completed", "stage": "search",
             "params": json.dumps({"prune_rate": p, "noise_multiplier": 1.0 + p}),
             "prune_rate": p, "noise_multiplier": 1.0 + p, "drop_rate": 0.0,
             "selection_metric": "val_accuracy,density", "epsilon_spent": 2.9}
            for i, p in enumerate((0.0, 0.5))]
    table = pa.Table.from_pylist(rows, schema=TRIALS_SCHEMA)
    assert default_columns(table) == [
        "trial_id", "stage", "status", "prune_rate", "noise_multiplier", "val_accuracy",
        "density", "test_accuracy", "epsilon_spent", "budget_used"]
    assert default_columns(table, ["-wall_time_s", "accuracy"])[-1] == "wall_time_s"
    epochs = pa.table({"trial_id": ["t0"], "epoch": [1]})
    assert default_columns(epochs) == ["trial_id", "epoch"]


def test_null_timestamp_is_null_in_json_and_a_dash_in_the_table(table: pa.Table) -> None:
    df = select_columns(table, ["trial_id", "finished_at"])
    df.loc[df.trial_id == "t07", "finished_at"] = pd.NaT  # a failed trial without a time
    assert json.loads(format_table(df, "json"))[6]["finished_at"] is None
    assert format_table(df, "table").splitlines()[8].split() == ["t07", "-"]
