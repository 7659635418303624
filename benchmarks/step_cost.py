"""Step cost of DP-SGD with pre-pruning and gradient dropping, on the CPU.

Measures training throughput (samples/s) of ``cnn-mnist`` at batch size 256 for:

1. non-private SGD (plain torch model and ``torch.optim.SGD``, no Opacus);
2. plain DP-SGD (prune rate 0, drop rate 0: Opacus' ``DPOptimizer`` path);
3. DP-SGD with unstructured pruning 0.8 (random, global);
4. DP-SGD with gradient dropping 0.8 (random);
5. DP-SGD with structured pruning 0.5 (random, layerwise);
6. DP-SGD with structured pruning 0.75 (random, layerwise);
7. "before": DP-SGD and drop 0.8 with Opacus' own ``GradSampleModule`` and the
   clone-and-restore step (what training used before
   :class:`trainables.grad_sample.FastGradSampleModule`).

Then where a DP step's time goes (forward, backward, per-sample gradients, clipping, noise,
scale + accounting, optimizer step, mask handling, other), before and after
(:mod:`step_phases`), and with ``--models`` the same non-private / DP / before comparison
for cnn-mnist at width 4 and ResNet-18-GN (``--resnet-batch``; 11M parameters' per-sample
gradients at batch 256 would need 11 GB).

DP configurations are built with :func:`trainables.train.build_run` and timed with
:func:`trainables.train.train_epoch` (real Poisson sampling); the non-private baseline runs
the same loop with the same sampler seed, so every configuration sees the same batches.
Configurations are interleaved round-robin across repeats; the median is reported.

Usage: ``python benchmarks/step_cost.py [--data {mnist-5k,shared}] [--steps N]
[--repeats R] [--warmup W] [--check]``. ``--check`` exits 1 if a target fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainables.config import TrialConfig
from trainables.data import Datasets
from trainables.models import build_model, count_params
from trainables.randomness import derived_seed
from trainables.train import Run, build_run, poisson_batch, seed_everything, train_epoch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conv_paths import conv_path_rows, print_conv_paths  # noqa: E402
from step_phases import SnapshotStep, phase_times, print_phases, use_opacus_module  # noqa: E402

#: The shared benchmark data sits next to the repository: <repo>/../shared/data/mnist.
SHARED = str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist")
BATCH_SIZE = 256
LEARNING_RATE = 0.1
SEED = 0
Timer = Callable[[int], tuple[int, float]]  # n_steps -> (samples, seconds)

#: name -> (pruning section, dropping section) of the trial config; None = non-private.
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]] | None] = {
    "non-private SGD": None,
    "DP-SGD": ({}, {}),
    "DP unstructured prune 0.8": ({"rate": 0.8, "criterion": "random", "scope": "global",
                                   "granularity": "unstructured"}, {}),
    "DP drop 0.8": ({}, {"rate": 0.8, "criterion": "random"}),
    "DP structured prune 0.5": ({"rate": 0.5, "criterion": "random", "scope": "layerwise",
                                 "granularity": "structured"}, {}),
    "DP structured prune 0.75": ({"rate": 0.75, "criterion": "random", "scope": "layerwise",
                                  "granularity": "structured"}, {}),
    "DP-SGD before": ({}, {}),
    "DP drop 0.8 before": ({}, {"rate": 0.8, "criterion": "random"}),
}
#: the DP step is at least this fraction of the non-private step's throughput
DP_TARGET = 0.85
#: --models: name -> (model section, batch size; None = --resnet-batch)
MODELS: dict[str, tuple[dict[str, Any], int | None]] = {
    "cnn-mnist": ({"name": "cnn-mnist"}, BATCH_SIZE),
    "cnn-mnist width 4": ({"name": "cnn-mnist", "width": 4.0}, BATCH_SIZE),
    "resnet18-gn": ({"name": "resnet18"}, None),
}


@dataclass
class Bench:
    """One configuration: how to time ``n`` steps, its trainable parameters, results."""

    name: str
    timer: Timer
    trainable: int
    rates: list[float]
    step_ms: list[float]


def dataset_section(data: str) -> dict[str, Any]:
    """The ``dataset`` section: bundled mnist-5k, or the shared IDX files (test: mnist-5k)."""
    if data == "mnist-5k":
        return {"name": "mnist-5k"}
    return {"name": "idx",
            "train_images": os.path.join(SHARED, "t10k-images-idx3-ubyte.gz"),
            "train_labels": os.path.join(SHARED, "t10k-labels-idx1-ubyte.gz"),
            "test": {"name": "mnist-5k"}}


def trial_config(data: str, pruning: dict[str, Any], dropping: dict[str, Any], *,
                 model: dict[str, Any] | None = None,
                 batch_size: int = BATCH_SIZE) -> TrialConfig:
    """A CPU trial whose privacy plan (eps 20, sigma 1, rdp) allows far more steps than timed
    (the accountant's bounds refuse a larger epsilon)."""
    return TrialConfig.from_dict({
        "seed": SEED, "device": "cpu", "dataset": dataset_section(data),
        "reproducible_noise": True,  # every configuration sees the same batches
        "model": model or {"name": "cnn-mnist"}, "pruning": pruning, "dropping": dropping,
        "privacy": {"epsilon": 20.0, "delta": 1e-5, "accountant": "rdp",
                    "noise_multiplier": 1.0},
        "optim": {"name": "sgd", "learning_rate": LEARNING_RATE, "batch_size": batch_size,
                  "max_epochs": 1000.0}})


def build_dp(config: TrialConfig, *, before: bool) -> Run:
    """The run as training builds it, or (``before``) with Opacus' ``GradSampleModule``
    and the clone-and-restore step."""
    if not before:
        return build_run(config)
    return use_opacus_module(build_run(config, optimizer_cls=SnapshotStep))


def dp_timer(run: Run, needed: int) -> Timer:
    """Time ``train_epoch`` on ``run``; fails early if the plan allows too few steps."""
    if run.plan.steps < needed:
        raise SystemExit(f"privacy plan allows {run.plan.steps} steps, {needed} are timed")

    def timer(n_steps: int) -> tuple[int, float]:
        _, samples, seconds, _ = train_epoch(run, n_steps)
        return samples, seconds
    return timer


def non_private_timer(data: Datasets, sample_rate: float,
                      config: TrialConfig | None = None) -> tuple[Timer, int]:
    """The same Poisson-sampled loop as ``train_epoch``, on a plain model and plain SGD."""
    seed_everything(SEED)
    model = build_model((config or TrialConfig()).model, num_classes=data.num_classes,
                        image_shape=data.image_shape)
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    sampler = torch.Generator().manual_seed(derived_seed(SEED, "sampler"))  # as build_run
    train = data.train

    def timer(n_steps: int) -> tuple[int, float]:
        model.train()
        samples, started = 0, time.perf_counter()
        for _ in range(n_steps):
            idx = poisson_batch(len(train), sample_rate, sampler)
            opt.zero_grad(set_to_none=True)
            if len(idx):
                loss = nn.functional.cross_entropy(model(train.images[idx]), train.labels[idx])
                loss.backward()
                loss.item()  # train_epoch reads the loss every step too
            opt.step()
            samples += len(idx)
        return samples, max(time.perf_counter() - started, 1e-9)
    return timer, count_params(model)


def build(data: str, needed: int) -> tuple[list[Bench], dict[str, Run]]:
    """Every configuration, built with the project's own code; also the runs by name."""
    benches: list[Bench] = []
    runs: dict[str, Run] = {}
    baseline: tuple[Datasets, float] | None = None
    for name, sections in CONFIGS.items():
        if sections is None:
            continue
        run = runs[name] = build_dp(trial_config(data, *sections),
                                    before=name.endswith(" before"))
        baseline = baseline or (run.data, run.plan.sample_rate)
        benches.append(Bench(name, dp_timer(run, needed), run.pruned.params_after, [], []))
    assert baseline is not None
    timer, params = non_private_timer(*baseline)
    return [Bench("non-private SGD", timer, params, [], []), *benches], runs


def build_models(data: str, needed: int, resnet_batch: int) -> list[list[Bench]]:
    """Per model of :data:`MODELS`: non-private, DP (after) and DP before."""
    groups = []
    for name, (model, batch) in MODELS.items():
        config = trial_config(data, {}, {}, model=model, batch_size=batch or resnet_batch)
        after, before = build_dp(config, before=False), build_dp(config, before=True)
        timer, params = non_private_timer(after.data, after.plan.sample_rate, config)
        groups.append([Bench(f"{name} non-private", timer, params, [], []),
                       Bench(f"{name} DP", dp_timer(after, needed), params, [], []),
                       Bench(f"{name} DP before", dp_timer(before, needed), params, [], [])])
    return groups


def report_models(groups: list[list[Bench]], batches: list[int]) -> bool:
    """Table: model, params, batch, non-private, DP, ratio, DP before, ratio before."""
    header = (f"{'model':<20}{'params':>12}{'batch':>7}{'non-private/s':>15}{'DP/s':>9}"
              f"{'ratio':>8}{'DP before/s':>13}{'ratio before':>14}")
    print("\n" + header + "\n" + "-" * len(header))
    ratios = []
    for (plain, dp, before), batch in zip(groups, batches, strict=True):
        rate = {b.name: statistics.median(b.rates) for b in (plain, dp, before)}
        ratio = rate[dp.name] / rate[plain.name]
        ratios.append(ratio)
        print(f"{plain.name.removesuffix(' non-private'):<20}{plain.trainable:>12,}{batch:>7}"
              f"{rate[plain.name]:>15.0f}{rate[dp.name]:>9.0f}{ratio:>8.3f}"
              f"{rate[before.name]:>13.0f}{rate[before.name] / rate[plain.name]:>14.3f}")
    return all(r >= DP_TARGET for r in ratios)


def measure(benches: list[Bench], steps: int, repeats: int, warmup: int) -> None:
    """Warm up each configuration, then time them round-robin, ``repeats`` times."""
    for bench in benches:
        bench.timer(warmup)
    for rep in range(repeats):
        for bench in benches:
            samples, seconds = bench.timer(steps)
            bench.rates.append(samples / seconds)
            bench.step_ms.append(1000 * seconds / steps)
        print(f"  repeat {rep + 1}/{repeats}: "
              + ", ".join(f"{b.rates[-1]:.0f}" for b in benches) + " samples/s", flush=True)


def report(benches: list[Bench]) -> bool:
    """Print the table and the two targets; return whether both pass."""
    by_name = {b.name: b for b in benches}
    rate = {b.name: statistics.median(b.rates) for b in benches}
    ms = {b.name: statistics.median(b.step_ms) for b in benches}
    base_rate, dp_ms = rate["non-private SGD"], ms["DP-SGD"]
    header = (f"{'config':<27}{'params trainable':>17}{'samples/s (median)':>20}"
              f"{'step ms':>10}{'ratio to non-private':>22}{'time vs DP-SGD':>16}")
    print("\n" + header + "\n" + "-" * len(header))
    for name in by_name:
        print(f"{name:<27}{by_name[name].trainable:>17,}{rate[name]:>20.0f}{ms[name]:>10.1f}"
              f"{rate[name] / base_rate:>22.3f}{ms[name] / dp_ms:>16.3f}")
    spread = max(statistics.pstdev(b.rates) / statistics.mean(b.rates) for b in benches)
    print(f"(largest relative stdev of samples/s across repeats: {spread:.1%}; "
          f"load average now {load_average()})")
    if spread > 0.10:
        print("WARNING: noisy measurements (another process competing for the CPU?); "
              "rerun on a quiet machine or with more --repeats")
    print()
    extra = {n: ms[n] / dp_ms - 1 for n in ("DP unstructured prune 0.8", "DP drop 0.8")}
    ok_a = all(v <= 0.10 for v in extra.values())
    speedup = rate["DP structured prune 0.75"] / rate["DP-SGD"]
    ok_b = speedup >= 2.0
    ratio, before = rate["DP-SGD"] / base_rate, rate["DP-SGD before"] / base_rate
    ok_c = ratio >= DP_TARGET
    print(f"(a) masking/dropping add <= 10% to DP-SGD step time: {'PASS' if ok_a else 'FAIL'} "
          f"({', '.join(f'{n}: {v:+.1%}' for n, v in extra.items())})")
    print(f"(b) structured prune 0.75 >= 2x DP-SGD throughput:   {'PASS' if ok_b else 'FAIL'} "
          f"({speedup:.2f}x)")
    print(f"(c) DP-SGD >= {DP_TARGET}x non-private throughput:      "
          f"{'PASS' if ok_c else 'FAIL'} ({ratio:.3f}x; before: {before:.3f}x)")
    return ok_a and ok_b and ok_c


def load_average() -> str:
    """The 1-minute load average, or ``n/a`` where the OS does not report it."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build, measure, report; 0 unless ``--check`` and a target fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Configurations:\n  " + "\n  ".join(CONFIGS))
    parser.add_argument("--data", choices=("mnist-5k", "shared"), default="mnist-5k",
                        help=f"mnist-5k (bundled, default) or shared: the IDX files in {SHARED}")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin repeats")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per config")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target fails")
    parser.add_argument("--phase-steps", type=int, default=10,
                        help="steps timed per configuration for the phase breakdown (0: none)")
    parser.add_argument("--models", action="store_true",
                        help="also compare cnn-mnist width 4 and ResNet-18-GN")
    parser.add_argument("--resnet-batch", type=int, default=32,
                        help="expected batch size of ResNet-18-GN under --models")
    parser.add_argument("--conv-paths", action="store_true",
                        help="also time the two forms of inner convolutions' per-sample "
                             "gradients per layer (grouped conv, unfolded matmul)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 is steadier "
                             "on a machine other jobs share")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if min(args.steps, args.repeats, args.resnet_batch) < 1 or min(args.warmup,
                                                                   args.phase_steps) < 0:
        parser.error("--steps, --repeats and --resnet-batch must be >= 1, "
                     "--warmup and --phase-steps >= 0")
    if args.data == "shared" and not os.path.isdir(SHARED):
        parser.error(f"--data shared: {SHARED} does not exist (use --data mnist-5k)")
    print(f"machine: {platform.machine()} {cpu_model()}, cpu count {os.cpu_count()}, "
          f"python {platform.python_version()}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {load_average()}")
    print(f"data {args.data}, cnn-mnist, expected batch {BATCH_SIZE} (Poisson), "
          f"{args.steps} steps x {args.repeats} repeats, warmup {args.warmup}", flush=True)
    warnings.filterwarnings("ignore", message="reproducible_noise is on")  # on purpose here
    needed = args.warmup + args.steps * args.repeats + args.phase_steps
    benches, runs = build(args.data, needed)
    measure(benches, args.steps, args.repeats, args.warmup)
    ok = report(benches)
    if args.phase_steps:
        print_phases({name: phase_times(runs[name], args.phase_steps) for name in
                      ("DP-SGD before", "DP-SGD", "DP drop 0.8 before", "DP drop 0.8")})
    if args.models:
        groups = build_models(args.data, needed, args.resnet_batch)
        print("\nmodels (the same loop; 'before' = Opacus' GradSampleModule):", flush=True)
        measure([b for group in groups for b in group], args.steps, args.repeats, args.warmup)
        batches = [batch or args.resnet_batch for _, batch in MODELS.values()]
        ok = report_models(groups, batches) and ok
    if args.conv_paths:
        print_conv_paths(conv_path_rows(args.repeats * args.steps))
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
