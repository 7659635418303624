"""Per-trial scheduling overhead and CPU utilisation of a dpstudy study on the embedded Ray.

1. ``--trials`` N trivial trials (a pure-Python loop of ``--work-s`` W seconds, reporting 3
   times with a tiny checkpoint, as real trials do each epoch) run through the service's
   machinery: ``make_search`` (OptunaSearch + ConcurrencyLimiter), ``tune.with_resources``,
   the service's ``RunConfig`` (FailureConfig, CheckpointConfig, ``StudyCallback`` writing
   Parquet), with ``reuse_actors`` True and False. The same N units of work timed in a plain
   loop give the ideal wall time on ``max_concurrent`` = 2 slots, ideal = N * W / 2, and
   ``overhead/trial = (wall_tune - ideal) * 2 / N``: the seconds each trial holds a slot
   beyond its work (target < 1 s). Ray startup (one ``ray.init``) is timed apart.
2. Busy % of the CPUs while the reuse_actors=True study runs (between ``fit()`` start and
   end): the whole system (/proc/stat) and this process tree (driver, Ray, workers) alone;
   target > 85 %. ``--real`` adds a study of ``--real-trials`` real 1-epoch DP trials
   (cnn-mnist on mnist-5k, batch 256, epsilon 8) through ``runner.make_trainable``.

Usage: ``python benchmarks/study_overhead.py [--trials N] [--work-s W] [--real]
[--real-trials M] [--check]``. Exits 0 unless ``--check`` and a target fails.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only; before Ray is imported
os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import optuna  # noqa: E402
import ray  # noqa: E402
from ray import tune  # noqa: E402

from study import runner  # noqa: E402
from study.space import make_search, noise_floor  # noqa: E402
from study.spec import StudySpec  # noqa: E402
from trainables.data import dataset_size  # noqa: E402

CONCURRENCY, REPORTS = 2, 3
Row = tuple[str, str, str, bool | None]  # measurement, value, target, pass (None: info)


def spin(iterations: int) -> int:
    """The unit of CPU work: a pure-Python loop (holds one core, no threads)."""
    x = 0
    for i in range(iterations):
        x = (x + i * i) % 1000003
    return x


def calibrate(work_s: float) -> int:
    """Iterations of :func:`spin` that take about ``work_s`` seconds here."""
    n, took = 100_000, 0.0
    while took < 0.2:
        n *= 2
        start = time.perf_counter()
        spin(n)
        took = time.perf_counter() - start
    return max(1, int(n * work_s / took))


def trivial_trial(config: dict[str, Any], iterations: int) -> None:
    """Function trainable: W seconds of work in ``REPORTS`` chunks, each reported with a
    tiny checkpoint and the metrics ``StudyCallback`` records."""
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    for epoch in range(1, REPORTS + 1):
        spin(iterations // REPORTS)
        metrics = {"epoch": epoch, "test_accuracy": 0.5 + 0.1 * epoch, "test_loss": 1.0,
                   "train_loss": 1.0, "epsilon_spent": epoch, "steps": 10 * epoch,
                   "wall_time_s": time.perf_counter() - started, "samples_per_s": 1.0}
        history.append(metrics)
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "state.json"), "w") as f:
                json.dump(metrics, f)
            tune.report({**metrics, "finished": epoch == REPORTS, "epochs": float(epoch),
                         "density": 1.0, "best_test_accuracy": metrics["test_accuracy"],
                         "epoch_history": json.dumps(history)},
                        checkpoint=tune.Checkpoint.from_directory(d))


def make_spec(name: str, trials: int, tmp: str, *, real: bool) -> StudySpec:
    """A small study spec (storage and results under ``tmp``)."""
    search: dict[str, Any] = {
        "prune_rate": {"low": 0.0, "high": 0.9}, "drop_rate": {"low": 0.0, "high": 0.9},
        "clip_norm": {"low": 0.1, "high": 4.0, "log": True},
        "noise_multiplier": {"low": 0.9, "high": 1.1} if real else {"low": 0.6, "high": 3.0},
        "learning_rate": {"low": 0.05, "high": 4.0, "log": True},
        "batch_size": 256, "max_epochs": 1 if real else REPORTS}
    return StudySpec.from_dict({
        "name": name, "dataset": {"name": "mnist-5k"}, "model": {"name": "cnn-mnist"},
        "device": "cpu", "privacy": {"epsilon": 8.0 if real else 3.0}, "search": search,
        "trials": trials, "max_concurrent": CONCURRENCY,
        "resources_per_trial": {"cpu": 1, "gpu": 0}, "storage": os.path.join(tmp, "runs"),
        "results": os.path.join(tmp, "results", name)})


class CpuMonitor:
    """Busy % of all CPUs (/proc/stat deltas) and of this process tree (/proc, sampled)."""

    def __init__(self, period_s: float = 0.25) -> None:
        self.period_s, self._stop = period_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._first: dict[tuple[int, int], int] = {}
        self._last: dict[tuple[int, int], int] = {}

    @staticmethod
    def _proc_stat() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v[:8]), v[3] + v[4]  # total, idle + iowait (guest is in user)

    def _sample(self, first: bool = False) -> None:
        stats: dict[int, list[str]] = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stats[int(pid)] = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
        children: dict[int, list[int]] = {}
        for pid, v in stats.items():
            children.setdefault(int(v[1]), []).append(pid)
        todo = [os.getpid()]
        while todo:
            pid = todo.pop()
            todo += children.get(pid, [])
            v = stats.get(pid)
            if v is not None:  # key (pid, start time); utime + stime in clock ticks
                key = (pid, int(v[19]))
                self._first.setdefault(key, int(v[11]) + int(v[12]) if first else 0)
                self._last[key] = int(v[11]) + int(v[12])

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> CpuMonitor:
        self._t0, self._stat0 = time.perf_counter(), self._proc_stat()
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        total, idle = (a - b for a, b in zip(self._proc_stat(), self._stat0, strict=True))
        self.system = 100.0 * (1 - idle / total) if total else 0.0
        ticks = sum(self._last[k] - self._first[k] for k in self._last)
        wall = time.perf_counter() - self._t0
        self.tree = 100.0 * ticks / os.sysconf("SC_CLK_TCK") / (wall * (os.cpu_count() or 1))


def run_study(spec: StudySpec, trainable: Any, *, reuse: bool, floor: float | None = None,
              ) -> tuple[float, CpuMonitor, runner.Summary]:
    """Fit a study the way ``runner.run`` does; returns fit() wall time, CPU, summary."""
    runner.save_spec(spec, runner.experiment_dir(spec))
    tuner = tune.Tuner(
        trainable, run_config=runner.run_config(spec),
        tune_config=tune.TuneConfig(search_alg=make_search(spec, floor),
                                    scheduler=runner.make_scheduler(spec),
                                    num_samples=spec.trials, reuse_actors=reuse))
    with CpuMonitor() as cpu:
        start = time.perf_counter()
        grid = tuner.fit()
        wall = time.perf_counter() - start
    return wall, cpu, runner._finish(spec, grid, runner.experiment_dir(spec))


def cpu_rows(label: str, cpu: CpuMonitor) -> list[Row]:
    """Busy % rows of one study."""
    return [(f"{label}: system CPU busy", f"{cpu.system:.1f} %", "> 85 %", cpu.system > 85),
            (f"{label}: own process tree busy", f"{cpu.tree:.1f} %", "> 85 %", cpu.tree > 85)]


def overhead(args: argparse.Namespace, tmp: str) -> list[Row]:
    """Part 1 (and the trivial half of part 2)."""
    iterations = calibrate(args.work_s)
    start = time.perf_counter()
    for _ in range(args.trials):
        spin(iterations)
    work = (time.perf_counter() - start) / args.trials
    ideal = args.trials * work / CONCURRENCY
    rows: list[Row] = [("work per trial W (plain loop)", f"{work:.3f} s", "", None),
                       (f"ideal wall = N*W/{CONCURRENCY}", f"{ideal:.2f} s", "", None)]
    for reuse in (True, False):
        spec = make_spec(f"overhead-reuse-{reuse}".lower(), args.trials, tmp, real=False)
        trainable = tune.with_resources(tune.with_parameters(
            trivial_trial, iterations=iterations), {"cpu": 1, "gpu": 0})
        wall, cpu, summary = run_study(spec, trainable, reuse=reuse)
        per = (wall - ideal) * CONCURRENCY / args.trials
        label = f"reuse_actors={reuse}"
        rows += [(f"{label}: tune wall ({summary.completed}/{args.trials} completed)",
                  f"{wall:.2f} s", "", None),
                 (f"{label}: overhead/trial", f"{per:.3f} s", "< 1 s", per < 1.0)]
        if reuse:
            rows += cpu_rows(label, cpu)
    return rows


def real(args: argparse.Namespace, tmp: str) -> list[Row]:
    """Part 2 with real 1-epoch DP trials through ``runner.make_trainable``."""
    spec = make_spec("overhead-real", args.real_trials, tmp, real=True)
    floor = noise_floor(spec, dataset_size(spec.dataset, seed=spec.seed))
    wall, cpu, summary = run_study(spec, runner.make_trainable(spec), reuse=True, floor=floor)
    from study.results import ResultsStore

    rows = ResultsStore(spec.results_path, spec.name).trials().to_pylist()
    train = [r["wall_time_s"] for r in rows if r.get("wall_time_s") is not None]
    per = (wall - sum(train) / CONCURRENCY) * CONCURRENCY / max(1, len(train))
    return [(f"real: tune wall ({summary.completed}/{spec.trials} completed)",
             f"{wall:.2f} s", "", None),
            ("real: wall per trial (wall*2/N)", f"{wall * CONCURRENCY / spec.trials:.2f} s",
             "", None),
            ("real: mean training time in trial", f"{sum(train) / max(1, len(train)):.2f} s",
             "", None),
            ("real: slot time beyond training/trial", f"{per:.2f} s", "", None),
            *cpu_rows("real", cpu)]


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure, print the table; 0 unless ``--check`` and a target fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="trivial trials (default 20)")
    parser.add_argument("--work-s", type=float, default=0.5, help="CPU work per trial, s")
    parser.add_argument("--real", action="store_true", help="also a study of real trials")
    parser.add_argument("--real-trials", type=int, default=4, help="real trials (default 4)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target fails")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.real_trials < 1 or args.work_s <= 0:
        parser.error("--trials and --real-trials must be >= 1, --work-s > 0")
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} before start, "
          f"ray {ray.__version__}, optuna {optuna.__version__}", flush=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    runner.init_ray()
    rows: list[Row] = [("ray.init (excluded)", f"{time.perf_counter() - start:.2f} s", "", None)]
    try:
        with tempfile.TemporaryDirectory(prefix="dpstudy-overhead-") as tmp:
            rows += overhead(args, tmp)
            if args.real:
                rows += real(args, tmp)
    finally:
        ray.shutdown()
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measurement':<{width}}  {'value':>10}  {'target':>7}  result")
    for name, value, target, ok in rows:
        verdict = "" if ok is None else ("PASS" if ok else "FAIL")
        print(f"{name:<{width}}  {value:>10}  {target:>7}  {verdict}")
    failed = any(ok is False for *_, ok in rows)
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
