"""Confirmation across seeds: the plan, what is still pending, and intervals that match
scipy.stats."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from study.analysis import confirm
from study.analysis.query import format_table


def search_row(tid: str, val: float, prune: float, drop: float = 0.0,
               status: str = "completed") -> dict:
    return {"trial_id": tid, "stage": "search", "status": status, "val_accuracy": val,
            "prune_rate": prune, "drop_rate": drop,
            "params": json.dumps({"prune_rate": prune, "drop_rate": drop})}


def confirm_row(config_id: str, seed: int, acc: float, status: str = "completed") -> dict:
    return {"trial_id": confirm.run_id(config_id, seed), "stage": "confirm",
            "config_id": config_id, "seed": seed, "status": status, "test_accuracy": acc,
            "epsilon_spent": 2.99}


SEARCH = [search_row("a", 0.90, 0.5), search_row("b", 0.88, 0.8), search_row("c", 0.70, 0.0),
          search_row("d", 0.95, 0.9, status="stopped")]


def test_plan_takes_top_k_by_validation_plus_baseline_with_shared_seeds() -> None:
    p = confirm.plan(SEARCH, metric="val_accuracy", mode="max", top=2, seeds=3, base_seed=10)
    assert [c["trial_id"] for c in p.configs] == ["a", "b", "c"]
    assert p.top_ids == ("a", "b") and p.baseline["trial_id"] == "c"
    assert p.seeds == (11, 12, 13)
    assert len(p.runs) == 9 and len({r["run_id"] for r in p.runs}) == 9
    assert {r["seed"] for r in p.runs if r["config_id"] == "c"} == set(p.seeds)
    assert p.runs[0]["params"] == {"prune_rate": 0.5, "drop_rate": 0.0}
    same = confirm.plan(SEARCH, metric="val_accuracy", mode="max", top=2, seeds=3, base_seed=10)
    assert same.key == p.key  # the Tune experiment of an interrupted plan is found again
    other = confirm.plan(SEARCH, metric="val_accuracy", mode="max", top=1, seeds=3, base_seed=10)
    assert other.key != p.key and len(other.runs) == 6


def test_plan_baseline_in_top_is_not_run_twice_and_empty_study_is_an_error() -> None:
    p = confirm.plan(SEARCH, metric="val_accuracy", mode="max", top=3, seeds=2, base_seed=0)
    assert [c["trial_id"] for c in p.configs] == ["a", "b", "c"] and len(p.runs) == 6
    with pytest.raises(ValueError, match="no completed search trial"):
        confirm.plan(SEARCH[3:], metric="val_accuracy", mode="max", top=1, seeds=2,
                     base_seed=0)


def test_pending_skips_completed_runs_only() -> None:
    p = confirm.plan(SEARCH, metric="val_accuracy", mode="max", top=1, seeds=2, base_seed=0)
    done = [confirm_row("a", 1, 0.9), confirm_row("a", 2, 0.9, status="failed")]
    assert [r["run_id"] for r in confirm.pending(p, SEARCH + done)] == [
        "a-seed2", "c-seed1", "c-seed2"]


def test_t_interval_matches_scipy() -> None:
    values = [0.91, 0.90, 0.935, 0.925]
    mean, std, low, high = confirm.t_interval(values)
    x = np.array(values)
    expected = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert mean == pytest.approx(x.mean()) and std == pytest.approx(x.std(ddof=1))
    assert (low, high) == pytest.approx(expected)
    assert confirm.t_interval([0.9])[2:] == (pytest.approx(math.nan, nan_ok=True),) * 2
    assert confirm.t_interval([0.9, 0.9]) == (0.9, 0.0, 0.9, 0.9)


def test_summary_intervals_and_paired_difference_to_baseline() -> None:
    p = confirm.plan(SEARCH, metric="val_accuracy", mode="max", top=1, seeds=3, base_seed=0)
    top = [0.92, 0.90, 0.95]
    base = [0.88, 0.89, 0.90]
    rows = SEARCH + [confirm_row("a", s, v) for s, v in zip(p.seeds, top, strict=True)] + [
        confirm_row("c", s, v) for s, v in zip(p.seeds, base, strict=True)]
    summary = {r["config_id"]: r for r in confirm.summarise(p, rows)}
    a, c = summary["a"], summary["c"]
    assert a["role"] == "top-1" and c["role"] == "baseline" and a["seeds"] == 3
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(top), scale=stats.sem(top))
    assert (a["ci95_low"], a["ci95_high"]) == pytest.approx((lo, hi))
    assert a["test_accuracy_std"] == pytest.approx(np.std(top, ddof=1))
    diffs = np.subtract(top, base)
    dlo, dhi = stats.t.interval(0.95, 2, loc=diffs.mean(), scale=stats.sem(diffs))
    assert a["diff_vs_baseline"] == pytest.approx(diffs.mean())
    assert (a["diff_ci95_low"], a["diff_ci95_high"]) == pytest.approx((dlo, dhi))
    assert "diff_vs_baseline" not in c and a["epsilon_spent"] == 2.99
    assert "top-1" in format_table(pd.DataFrame(confirm.summarise(p, rows)), "table")
