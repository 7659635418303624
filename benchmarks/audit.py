"""Claimed vs audited epsilon: the one-run audit of the correct mechanism and of sabotages.

Prints one table row per audit: mechanism, claimed epsilon (accountant), audited lower bound
(``jax_privacy.auditing.CanaryScoreAuditor.epsilon_one_run``), canaries, confidence, test
accuracy and wall time. Real DP training on mnist-5k (4,000 training images), cnn-mnist,
expected batch 1000 (q = 0.25), 4 epochs (16 steps), sigma calibrated by the RDP accountant
for each claimed epsilon, learning rate 1, C = 1; white-box Dirac canaries.

    python benchmarks/audit.py                      # claimed {1,2,4,8} + 4 sabotages at 2
    python benchmarks/audit.py --canaries 1000 --width 0.5 --seeds 0 1
    python benchmarks/audit.py --canaries 1000 --width 0.5 --only noise-x0.1 --repeats 5

The sabotages are the test-only optimizers of ``tests/trainables/sabotage.py``. The DP
noise and batches come from each run's secret OS-entropy seed, so a row is one draw: the
same ``--seeds`` (canary draw, model initialisation) give different bounds on every run.
``--repeats N`` runs each case N times and adds a ``median of N`` row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "trainables"))
sys.path.insert(0, os.path.join(HERE, ".."))

from sabotage import SABOTAGES  # noqa: E402

from trainables.audit import AuditConfig, run_audit  # noqa: E402
from trainables.optimizer import MaskedDPOptimizer  # noqa: E402


def trial(epsilon: float, *, width: float, drop_rate: float, seed: int) -> dict:
    return {"seed": seed, "device": "cpu", "model": {"name": "cnn-mnist", "width": width},
            "dropping": {"rate": drop_rate},
            "privacy": {"epsilon": epsilon, "delta": 1e-5, "epochs": 4, "accountant": "rdp"},
            "optim": {"learning_rate": 1.0, "clip_norm": 1.0, "batch_size": 1000,
                      "max_epochs": 4}}


def cases(claimed: list[float], sabotage_eps: float) -> list[tuple[str, type, float, float]]:
    out = [("correct", MaskedDPOptimizer, eps, 0.0) for eps in claimed]
    out += [("correct, drop 0.5", MaskedDPOptimizer, sabotage_eps, 0.5)]
    out += [(name, cls, sabotage_eps, 0.5 if name == "noise-on-dropped" else 0.0)
            for name, cls in SABOTAGES.items()]
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, audit every selected mechanism, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=5000)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--width", type=float, default=1.0, help="cnn-mnist width")
    parser.add_argument("--claimed", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--sabotage-epsilon", type=float, default=2.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", default=None, metavar="MECHANISM",
                        help="run only these cases (correct, 'correct, drop 0.5', sabotages)")
    parser.add_argument("--repeats", type=int, default=1, help="draws per case and seed")
    args = parser.parse_args(argv)
    print(f"| mechanism | seed | drop | claimed eps | audited eps (>= at {args.confidence:g}) "
          f"| m | in | sigma | test acc | wall s | caught |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    started = time.perf_counter()
    for name, cls, eps, drop in cases(args.claimed, args.sabotage_epsilon):
        if args.only is not None and name not in args.only:
            continue
        for seed in args.seeds:
            audited = []
            for _ in range(args.repeats):
                r = run_audit(trial(eps, width=args.width, drop_rate=drop, seed=seed),
                              AuditConfig(canaries=args.canaries, confidence=args.confidence,
                                          seed=seed), optimizer_cls=cls)
                audited.append(r.epsilon_audited)
                caught = "VIOLATION" if r.epsilon_audited > r.epsilon_claimed else "-"
                print(f"| {name} | {seed} | {drop:g} | {r.epsilon_claimed:.3f} | "
                      f"{r.epsilon_audited:.3f} | {r.canaries} | {r.included} | "
                      f"{r.noise_multiplier:.3f} | {r.test_accuracy:.3f} | "
                      f"{r.wall_time_s:.1f} | {caught} |", flush=True)
            if args.repeats > 1:
                print(f"| {name}: median of {args.repeats} | {seed} | {drop:g} | "
                      f"{r.epsilon_claimed:.3f} | {statistics.median(audited):.3f} | "
                      f"| | | | | |", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
