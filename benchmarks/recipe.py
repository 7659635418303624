"""The DP image-classification recipe against plain DP-SGD: augmentation multiplicity + EMA.

On the 10,000 shared MNIST images (``../shared/data/mnist``, the private training set;
10% carved off for validation) with the 5,000 ``mnist-5k`` images as the test set, at
epsilon 3 and delta 1e-5, for ``cnn-mnist`` of each width, three arms:

- ``plain``: DP-SGD, K = 1, no parameter averaging;
- ``k4-ema`` and ``k8-ema``: K = 4 or 8 augmented views per example (gradients averaged
  before clipping, :mod:`trainables.augment`) and an EMA of the parameters.

All at a logical batch of 1,000 (physical batch 1,024 images per pass). Each arm is tuned by
a small random search (``--trials``, default 6: learning rate log-uniform in [0.5, 8]; the
EMA decay log-uniform in 1 - [0.001, 0.1] for the EMA arms), selected on validation
accuracy, and its best configuration confirmed over ``--seeds`` (default 3) fresh seeds:
mean test accuracy with a 95% t-interval, and the compute it cost (trial-epochs, image
passes = epochs x K x examples, wall time). The noise is calibrated so that every trial
spends the whole budget in ``--epochs`` epochs.

Resumable: every finished trial is one JSON line in ``--results`` (default
``benchmarks/results/recipe.jsonl``); a rerun skips the work already there (trial
parameters are drawn from per-trial seeds, so a rerun draws the same ones). ``--smoke``
is a tiny run (mnist-5k, one width, two arms, one trial, two seeds) for the test suite.

Usage: ``python benchmarks/recipe.py [--widths 1,4] [--arms plain,k4-ema,k8-ema]
[--trials 6] [--seeds 3] [--epochs 5] [--results FILE] [--report] [--smoke]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "mnist"
ARMS: dict[str, dict[str, Any]] = {
    "plain": {"augmentation_multiplicity": 1, "ema": False},
    "k2-ema": {"augmentation_multiplicity": 2, "ema": True},
    "k4-ema": {"augmentation_multiplicity": 4, "ema": True},
    "k8-ema": {"augmentation_multiplicity": 8, "ema": True},
}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262}  # Student t quantiles, 95% two-sided, by degrees of freedom


def dataset(smoke: bool) -> dict[str, Any]:
    """The shared 10k images as training data (test: mnist-5k); mnist-5k alone for smoke."""
    if smoke:
        return {"name": "mnist-5k", "test_fraction": 0.8}
    return {"name": "idx", "train_images": str(SHARED / "t10k-images-idx3-ubyte.gz"),
            "train_labels": str(SHARED / "t10k-labels-idx1-ubyte.gz"),
            "test": {"name": "mnist-5k"}}


def draw_params(width: float, arm: str, index: int) -> dict[str, float]:
    """Trial ``index``'s hyperparameters (a random search with a per-trial seed)."""
    rng = np.random.default_rng([int(width * 10), list(ARMS).index(arm), index])
    params = {"learning_rate": float(np.exp(rng.uniform(math.log(0.5), math.log(8.0))))}
    if ARMS[arm]["ema"]:
        params["ema_decay"] = float(1 - np.exp(rng.uniform(math.log(0.001), math.log(0.1))))
    return params


def trial_config(args: argparse.Namespace, width: float, arm: str, params: dict[str, float],
                 seed: int) -> dict[str, Any]:
    """The :class:`trainables.config.TrialConfig` dict of one run."""
    return {
        "seed": seed, "device": "cpu", "dataset": dataset(args.smoke),
        "model": {"name": "cnn-mnist", "width": width},
        "privacy": {"epsilon": 3.0, "delta": 1e-5,
                    "accountant": "rdp" if args.smoke else "prv", "epochs": args.epochs},
        "optim": {"learning_rate": params["learning_rate"], "clip_norm": 1.0,
                  "momentum": 0.0, "batch_size": args.batch_size,
                  "max_epochs": args.epochs + 1, "physical_batch_size": args.physical,
                  "augmentation_multiplicity": ARMS[arm]["augmentation_multiplicity"],
                  "ema_decay": params.get("ema_decay")},
    }


def run_one(args: argparse.Namespace, key: dict[str, Any], params: dict[str, float],
            seed: int) -> dict[str, Any]:
    """Train one run and return its record."""
    from trainables.train import train

    cfg = trial_config(args, key["width"], key["arm"], params, seed)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = train(cfg)
    k = ARMS[key["arm"]]["augmentation_multiplicity"]
    return {**key, "params": params, "seed": seed, "val_accuracy": final["val_accuracy"],
            "test_accuracy": final["test_accuracy"], "epochs": final["epochs"],
            "epsilon_spent": final["epsilon_spent"], "steps": final["steps"],
            "image_passes": final["epochs"] * k * round(args.batch_size /
                                                        final["sample_rate"]),
            "wall_s": time.perf_counter() - started, "load": os.getloadavg()[0]}


def done_records(path: str) -> list[dict[str, Any]]:
    """The records already in the results file."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def ident(r: dict[str, Any]) -> tuple:
    """A run's identity: a confirmation run also by the configuration it confirms (more
    tuning trials may change the best one)."""
    confirms = json.dumps(r["params"], sort_keys=True) if r["stage"] == "confirm" else None
    return (r["mode"], r["width"], r["arm"], r["stage"], r["index"], confirms)


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Tune then confirm every (width, arm), skipping what the results file holds."""
    records = done_records(args.results)
    have = {ident(r) for r in records}
    mode = "smoke" if args.smoke else "full"
    for width in args.widths:
        for arm in args.arms:
            for index in range(args.trials):
                key = {"mode": mode, "width": width, "arm": arm, "stage": "tune",
                       "index": index}
                if ident(key) not in have:
                    append(args, records, run_one(args, key, draw_params(width, arm, index),
                                                  seed=index))
            tuned = [r for r in records if r["mode"] == mode and r["width"] == width
                     and r["arm"] == arm and r["stage"] == "tune"]
            best = max(tuned, key=lambda r: r["val_accuracy"])
            for index in range(args.seeds):
                key = {"mode": mode, "width": width, "arm": arm, "stage": "confirm",
                       "index": index, "params": best["params"]}
                if ident(key) not in have:
                    append(args, records, run_one(args, key, best["params"],
                                                  seed=1000 + index))
    return records


def append(args: argparse.Namespace, records: list[dict[str, Any]], rec: dict[str, Any]) -> None:
    records.append(rec)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan with one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T_975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))


def report(records: list[dict[str, Any]], mode: str) -> str:
    """The Markdown table: per (width, arm) the tuned configuration, confirmed accuracy
    and compute; and whether each recipe arm beats plain beyond both intervals."""
    lines = ["| width | arm | trials | best params | seeds | test accuracy (95% CI) | "
             "trial-epochs | image passes (M) | wall s |",
             "| ---: | --- | ---: | --- | ---: | --- | ---: | ---: | ---: |"]
    summary: dict[tuple, tuple[float, float]] = {}
    groups = dict.fromkeys((r["width"], r["arm"]) for r in records if r["mode"] == mode)
    for width, arm in groups:
        rs = [r for r in records if r["mode"] == mode and r["width"] == width
              and r["arm"] == arm]
        tune = [r for r in rs if r["stage"] == "tune"]
        conf = [r for r in rs if r["stage"] == "confirm"]
        best = max(tune, key=lambda r: r["val_accuracy"])["params"] if tune else {}
        conf = [r for r in conf if r["params"] == best]  # confirmations of the best
        acc = "not run"
        if conf:
            mean, half = interval([r["test_accuracy"] for r in conf])
            summary[(width, arm)] = (mean, half)
            acc = f"{mean:.4f} ± {half:.4f}"
        shown = ", ".join(f"{k}={v:.3g}" for k, v in best.items())
        lines.append(f"| {width:g} | {arm} | {len(tune)} | {shown} | {len(conf)} | {acc} | "
                     f"{sum(r['epochs'] for r in rs):.1f} | "
                     f"{sum(r['image_passes'] for r in rs) / 1e6:.2f} | "
                     f"{sum(r['wall_s'] for r in rs):.0f} |")
    for (width, arm), (mean, half) in summary.items():
        if arm == "plain" or (width, "plain") not in summary:
            continue
        base, base_half = summary[(width, "plain")]
        beyond = mean - half > base + base_half
        verdict = "beats" if beyond else "does NOT beat"
        lines.append(f"\nwidth {width:g}: {arm} {mean:.4f} vs plain {base:.4f}: {verdict} "
                     f"plain beyond both 95% intervals")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="1,4")
    p.add_argument("--arms", default="plain,k4-ema,k8-ema")
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--physical", type=int, default=1024)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "recipe.jsonl"))
    p.add_argument("--report", action="store_true", help="print the table of what is in "
                   "--results and exit")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.widths, args.arms, args.trials, args.seeds = "1", "plain,k2-ema", 1, 2
        args.epochs, args.batch_size, args.physical = 1.0, 300, 256
    args.widths = [float(w) for w in args.widths.split(",")]
    args.arms = args.arms.split(",")
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        p.error(f"--arms: unknown arm(s) {unknown} (known: {', '.join(ARMS)})")
    if not args.smoke and not SHARED.is_dir():
        p.error(f"the shared data {SHARED} is missing (see ../shared/data/README.md); "
                f"use --smoke")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    mode = "smoke" if args.smoke else "full"
    records = done_records(args.results) if args.report else run_all(args)
    print(f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load "
          f"average {os.getloadavg()[0]:.1f} (shared with other jobs)")
    print(report(records, mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
