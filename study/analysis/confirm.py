"""Confirmation across seeds: re-run the chosen configurations, then summarise with intervals.

One lucky seed can decide a search: DP-SGD's spread across seeds is as large as the effects
users look for. ``dpstudy confirm`` (or ``confirm:`` in a spec) re-trains the ``top`` K
configurations, plus a baseline (prune 0, drop 0), each with the same S fresh seeds. Each
re-run is a ``trials.parquet`` row with ``stage = confirm``, ``config_id`` = the search
trial it re-trains, and a run id derived from (config_id, seed), so an interrupted
confirmation resumed later records every run exactly once. The runs themselves go through
Ray Tune in :func:`study.execution.runner.confirm`.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass
from typing import Any

from study.analysis import selection

Row = dict[str, Any]
CONFIDENCE = 0.95


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The configurations to confirm (search rows; ``baseline`` may be one of them or extra)
    and the seeds every one of them runs with."""

    configs: tuple[Row, ...]
    baseline: Row | None
    seeds: tuple[int, ...]
    metric: str
    top_ids: tuple[str, ...] = ()
    runs: tuple[Row, ...] = ()

    @property
    def key(self) -> str:
        """A short digest of what is run, naming the Tune experiment of this plan."""
        text = json.dumps([[r["run_id"] for r in self.runs]], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_id(config_id: str, seed: int) -> str:
    """The row id of the confirmation run of ``config_id`` with ``seed``."""
    return f"{config_id}-seed{seed}"


def confirm_seeds(base_seed: int, count: int) -> tuple[int, ...]:
    """``count`` seeds different from the search's own (``base_seed``), the same for every
    configuration so differences are paired."""
    return tuple(base_seed + 1 + i for i in range(count))


def plan(rows: list[Row], *, metric: str, mode: str, top: int, seeds: int, base_seed: int,
         baseline_id: str | None = None) -> Plan:
    """The runs confirming the ``top`` configurations (and the baseline) over ``seeds`` seeds.

    Raises ValueError when the study has no completed search trial to confirm.
    """
    chosen = selection.ranked(rows, metric, mode)[:top]
    if not chosen:
        raise ValueError(f"confirm: the study has no completed search trial with {metric} "
                         f"to confirm (got {len(rows)} rows)")
    base = selection.baseline(rows, metric, mode, baseline_id)
    configs = list(chosen)
    if base is not None and base["trial_id"] not in {r["trial_id"] for r in configs}:
        configs.append(base)
    seed_list = confirm_seeds(base_seed, seeds)
    runs = tuple({"run_id": run_id(c["trial_id"], s), "config_id": c["trial_id"], "seed": s,
                  "params": json.loads(c["params"])}
                 for c in configs for s in seed_list)
    return Plan(configs=tuple(configs), baseline=base, seeds=seed_list, metric=metric,
                top_ids=tuple(r["trial_id"] for r in chosen), runs=runs)


def recorded_plan(rows: list[Row], *, metric: str, mode: str) -> Plan | None:
    """The plan behind the confirmation runs recorded in ``rows`` (for reports): the
    confirmed configurations in search-rank order, their seeds, and the one with prune
    rate 0 and drop rate 0 as baseline (a baseline named with ``--baseline`` that prunes
    or drops is not recognised here). None when nothing was confirmed."""
    runs = [r for r in rows if r.get("stage") == "confirm"]
    if not runs:
        return None
    confirmed = {r["config_id"] for r in runs}
    search = {r["trial_id"]: r for r in rows if selection.is_search(r)}
    configs = [search[c] for c in sorted(confirmed) if c in search]
    order = {r["trial_id"]: i for i, r in enumerate(selection.ranked(rows, metric, mode))}
    configs.sort(key=lambda r: order.get(r["trial_id"], len(order)))
    base = next((c for c in configs if selection.is_baseline(c)), None)
    # the baseline is one of the top configurations unless it ranks after all of them
    extra = base if len(configs) > 1 and configs[-1] is base else None
    top = tuple(c["trial_id"] for c in configs if c is not extra)
    return Plan(configs=tuple(configs), baseline=base, metric=metric, top_ids=top,
                seeds=tuple(sorted({int(r["seed"]) for r in runs})))


def pending(p: Plan, rows: list[Row]) -> list[Row]:
    """The runs of ``p`` that have no completed row yet."""
    done = {r["trial_id"] for r in rows
            if r.get("stage") == "confirm" and r.get("status") == "completed"}
    return [r for r in p.runs if r["run_id"] not in done]


def t_interval(values: list[float], *,
               confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(mean, sample standard deviation, low, high) of a Student-t interval for the mean at
    ``confidence`` (95% by default); the interval is NaN for fewer than two values."""
    from scipy import stats

    mean = statistics.fmean(values) if values else math.nan
    if len(values) < 2:
        return mean, math.nan, math.nan, math.nan
    std = statistics.stdev(values)
    if std == 0:
        return mean, 0.0, mean, mean
    low, high = stats.t.interval(confidence, df=len(values) - 1, loc=mean,
                                 scale=std / math.sqrt(len(values)))
    return mean, std, float(low), float(high)


def summarise(p: Plan, rows: list[Row], *, value: str = "test_accuracy") -> list[Row]:
    """One row per configuration of ``p``: seeds done, ``value`` mean/std/interval, epsilon
    spent, and the paired difference to the baseline over their common seeds."""
    runs = {(r["config_id"], r["seed"]): r for r in rows
            if r.get("stage") == "confirm" and r.get("status") == "completed"
            and r.get(value) is not None}
    base_id = p.baseline["trial_id"] if p.baseline is not None else None
    out = []
    for config in p.configs:
        cid = config["trial_id"]
        scores = {s: runs[(cid, s)][value] for s in p.seeds if (cid, s) in runs}
        mean, std, low, high = t_interval(list(scores.values()))
        spent = [runs[(cid, s)]["epsilon_spent"] for s in scores]
        role = [f"top-{p.top_ids.index(cid) + 1}"] if cid in p.top_ids else []
        role += ["baseline"] if cid == base_id else []
        row = {"config_id": cid, "role": ", ".join(role),
               "prune_rate": config.get("prune_rate"), "drop_rate": config.get("drop_rate"),
               "search_" + p.metric: config.get(p.metric), "seeds": len(scores),
               f"{value}_mean": mean, f"{value}_std": std, "ci95_low": low, "ci95_high": high,
               "epsilon_spent": max(spent) if spent else None}
        if base_id is not None and cid != base_id:
            pairs = [scores[s] - runs[(base_id, s)][value] for s in scores
                     if (base_id, s) in runs]
            d_mean, _, d_low, d_high = t_interval(pairs)
            row.update(diff_vs_baseline=d_mean, diff_ci95_low=d_low, diff_ci95_high=d_high)
        out.append(row)
    return out

