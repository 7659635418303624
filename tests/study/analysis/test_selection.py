"""Selection over result rows: validation decides, only completed search trials compete,
and the baseline is plain DP-SGD."""

from __future__ import annotations

import json

import pytest

from study.analysis import selection


def row(tid: str, *, val: float | None, test: float | None, status: str = "completed",
        prune: float = 0.5, drop: float = 0.0, stage: str | None = "search") -> dict:
    return {"trial_id": tid, "status": status, "stage": stage, "val_accuracy": val,
            "test_accuracy": test, "prune_rate": prune, "drop_rate": drop,
            "params": json.dumps({"prune_rate": prune, "drop_rate": drop})}


ROWS = [
    row("a", val=0.80, test=0.95),                       # best on test, not on validation
    row("b", val=0.90, test=0.85),                       # best on validation
    row("c", val=0.99, test=0.99, status="stopped"),     # stopped early: not a candidate
    row("d", val=0.95, test=0.97, stage="confirm"),      # a re-run, not a candidate
    row("e", val=0.70, test=0.70, prune=0.0),            # plain DP-SGD
    row("f", val=float("nan"), test=0.50),               # no validation score
    row("g", val=0.85, test=0.80, stage=None),           # written before stages existed
]


def test_best_follows_validation_not_test() -> None:
    assert selection.best(ROWS, "val_accuracy", "max")["trial_id"] == "b"
    assert selection.best(ROWS, "test_accuracy", "max")["trial_id"] == "a"
    assert selection.best(ROWS, "val_accuracy", "min")["trial_id"] == "e"


def test_ranked_candidates_are_completed_search_trials_with_a_value() -> None:
    assert [r["trial_id"] for r in selection.ranked(ROWS, "val_accuracy", "max")] == [
        "b", "g", "a", "e"]
    assert selection.best([], "val_accuracy", "max") is None


def test_ties_are_broken_by_trial_id() -> None:
    tied = [row("z", val=0.9, test=0.9), row("y", val=0.9, test=0.8)]
    assert [r["trial_id"] for r in selection.ranked(tied, "val_accuracy", "max")] == ["y", "z"]


def test_baseline_is_best_plain_dp_sgd_or_a_stopped_one_or_named() -> None:
    assert selection.baseline(ROWS, "val_accuracy", "max")["trial_id"] == "e"
    stopped_only = [row("s", val=0.5, test=0.5, prune=0.0, status="stopped"), *ROWS[:2]]
    assert selection.baseline(stopped_only, "val_accuracy", "max")["trial_id"] == "s"
    assert selection.baseline(ROWS[:2], "val_accuracy", "max") is None
    assert selection.baseline(ROWS, "val_accuracy", "max", "a")["trial_id"] == "a"
    with pytest.raises(ValueError, match="--baseline: must name a search trial.*'nope'"):
        selection.baseline(ROWS, "val_accuracy", "max", "nope")
