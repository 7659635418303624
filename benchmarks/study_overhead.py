"""Per-trial scheduling overhead and CPU utilisation of a dpstudy study on the embedded Ray.

N trivial trials (W s of pure-Python work in 3 reports, each with a tiny checkpoint, like real
epochs) run through the service's machinery (make_search: OptunaSearch + ConcurrencyLimiter;
with_resources; runner.run_config: FailureConfig, CheckpointConfig, StudyCallback to Parquet)
with reuse_actors True and False. The work in a plain loop gives ideal = N*W/2 on 2 slots, and
overhead/trial = (wall_tune - ideal) * 2 / N, the time a trial holds a slot beyond its work
(target < 0.3 s; ray.init is timed apart, excluded), and the driver's CPU time (Tune's
controller, its snapshots, the callbacks). CPU busy % during fit() (target > 85 %),
system-wide and of this process tree, for reuse_actors=True and, with --real, for --real-trials
real 1-epoch DP trials (runner.make_trainable; cnn-mnist, mnist-5k, batch 256, epsilon 8).
--check exits 1 if a target fails (targets in parentheses, reuse_actors=False, do not count).
"""
# ruff: noqa: E402
from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only; before Ray is imported
os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

import argparse
import contextlib
import json
import math
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import optuna
import ray
from ray import tune

from study.execution import cluster, runner
from study.execution.callbacks import StudyCallback
from study.search.space import NoiseBudget, make_search, noise_budget
from study.spec.model import StudySpec
from study.storage import experiment
from study.storage.store import ResultsStore
from trainables.data import dataset_size

CONCURRENCY, REPORTS = 2, 3
TARGET_S = 0.3  # per-trial overhead target (reuse_actors=True)
Row = tuple[str, str, str, bool | None]  # measurement, value, target, passed (None: no target)


def spin(iterations: int) -> int:
    """The unit of CPU work: a pure-Python loop (one core, no threads)."""
    x = 0
    for i in range(iterations):
        x = (x + i * i) % 1000003
    return x


def trivial_trial(config: dict[str, Any], iterations: int) -> None:
    """Function trainable: the work in ``REPORTS`` parts, each reported with a tiny checkpoint
    and the metrics ``StudyCallback`` records (``finished``, ``epoch_history``, ...)."""
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    for epoch in range(1, REPORTS + 1):
        spin(iterations // REPORTS)
        metrics = {"epoch": epoch, "epochs": float(epoch), "val_accuracy": 0.5 + 0.1 * epoch,
                   "test_accuracy": 0.5 + 0.1 * epoch,
                   "steps": 10 * epoch, "wall_time_s": time.perf_counter() - started}
        history.append(metrics)
        result = {**metrics, "finished": epoch == REPORTS, "epoch_history": json.dumps(history)}
        with tempfile.TemporaryDirectory() as d:
            pathlib.Path(d, "state.json").write_text(json.dumps(metrics))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))


def make_spec(name: str, trials: int, tmp: str, *, real: bool) -> StudySpec:
    """A small study spec with its storage and results under ``tmp``."""
    return StudySpec.from_dict({
        "name": name, "dataset": "mnist-5k", "model": "cnn-mnist", "device": "cpu",
        "privacy": {"epsilon": 8.0 if real else 3.0}, "search": {
            "prune_rate": {"low": 0.0, "high": 0.9}, "drop_rate": {"low": 0.0, "high": 0.9},
            "clip_norm": {"low": 0.1, "high": 4.0, "log": True},
            "noise_multiplier": {"low": 0.9, "high": 1.1} if real else {"low": 0.6, "high": 3},
            "learning_rate": {"low": 0.05, "high": 4.0, "log": True},
            "batch_size": 256, "max_epochs": 1 if real else REPORTS},
        "trials": trials, "max_concurrent": CONCURRENCY, "resources_per_trial": {"cpu": 1},
        "storage": os.path.join(tmp, "runs"), "results": os.path.join(tmp, "results", name)})


class Monitor(tune.Callback):
    """Trial start/end times, and inside ``with`` the CPU busy % of all CPUs (/proc/stat) and
    of this process tree (driver, Ray, workers; /proc sampled from Tune's loop every >= 0.25 s),
    and the % of CPU time the tree's main threads were runnable but waiting for a CPU."""

    def __init__(self) -> None:
        self.starts: dict[str, float] = {}
        self.ends: dict[str, float] = {}
        self._use: dict[tuple[int, str], list[int]] = {}  # (pid, start) -> CPU, wait: 0, now
        self._due, self.system, self.tree, self.wait = math.inf, math.nan, math.nan, math.nan

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.starts[trial.trial_id] = time.perf_counter()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ends[trial.trial_id] = time.perf_counter()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.perf_counter() >= self._due:
            self._sample()

    @staticmethod
    def _proc_stat() -> tuple[int, int]:
        v = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(v[:8]), v[3] + v[4]  # total, idle + iowait (guest is counted in user)

    def _sample(self, first: bool = False) -> None:
        self._due, stats = time.perf_counter() + 0.25, {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
                stats[int(pid)] = f.read().rsplit(")", 1)[1].split()
        children: dict[int, list[int]] = {}
        for pid, v in stats.items():
            children.setdefault(int(v[1]), []).append(pid)
        todo = [os.getpid()]
        while todo:  # utime, stime and start time are fields 14, 15 and 22 of stat
            pid = todo.pop()
            todo += children.get(pid, [])
            if (v := stats.get(pid)) is not None:
                with contextlib.suppress(OSError), open(f"/proc/{pid}/schedstat") as f:
                    now, key = [int(v[11]) + int(v[12]), int(f.read().split()[1])], (pid, v[19])
                    start = now if first else [0, 0]  # a process started later counts from 0
                    self._use[key] = self._use.get(key, start)[:2] + now

    def __enter__(self) -> Monitor:
        self._t0, self._stat0 = time.perf_counter(), self._proc_stat()
        self._sample(first=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._sample()
        total, idle = (a - b for a, b in zip(self._proc_stat(), self._stat0, strict=True))
        self.system = 100.0 * (1 - idle / total) if total else 0.0
        used, waited = (sum(u[i + 2] - u[i] for u in self._use.values()) for i in (0, 1))
        span = (time.perf_counter() - self._t0) * (os.cpu_count() or 1) / 100.0
        self.tree, self.wait = used / os.sysconf("SC_CLK_TCK") / span, waited / 1e9 / span

    def phases(self, start: float, wall: float, slots: int) -> dict[str, float]:
        """Where the wall time of a study fitted from ``start`` for ``wall`` s went."""
        s, e, nan = sorted(self.starts.values()), sorted(self.ends.values()), [math.nan]
        gaps = [s[k + slots] - e[k] for k in range(len(s) - slots)]  # slot freed -> next start
        runs = [self.ends[t] - self.starts[t] for t in self.ends if t in self.starts]
        return {"fit() start -> first trial started": (s or nan)[0] - start,
                "trial started -> completed, mean": statistics.fmean(runs or nan),
                "slot idle between trials, mean": statistics.fmean(gaps or nan),
                "last trial completed -> fit() returned": start + wall - (e or nan)[-1]}


def run_study(label: str, spec: StudySpec, trainable: Any, *, reuse: bool,
              budget: NoiseBudget | None = None) -> tuple[float, list[Row]]:
    """Fit a study as ``runner.run`` does; returns fit()'s wall time and the rows for it."""
    experiment.save_spec(spec, experiment.experiment_dir(spec))
    config, monitor = runner.run_config(spec), Monitor()
    hooks = [time_hooks(cb) for cb in config.callbacks if isinstance(cb, StudyCallback)]
    config.callbacks.append(monitor)
    tuner = tune.Tuner(trainable, run_config=config, tune_config=tune.TuneConfig(
        search_alg=make_search(spec, budget), scheduler=runner.make_scheduler(spec),
        num_samples=spec.trials, reuse_actors=reuse))
    with monitor:  # CPU use from fit() start to end
        start, cpu = time.perf_counter(), time.process_time()
        grid = tuner.fit()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    done = runner.finish(spec, grid, False, experiment.experiment_dir(spec)).completed
    rows = info(label, {f"tune wall ({done}/{spec.trials} completed)": wall,
                        **monitor.phases(start, wall, spec.max_concurrent)})
    longest = max((max(h.values(), default=(0.0, "-")) for h in hooks), default=(0.0, "-"))
    rows.append((f"{label}: longest StudyCallback hook ({longest[1]})", f"{longest[0]:.3f} s",
                 "< 0.1 s", longest[0] < 0.1))
    rows.append((f"{label}: driver CPU during fit() (% of one core)",
                 f"{cpu:.2f} s ({100 * cpu / wall:.0f} %)", "", None))
    if reuse:  # the service's setting
        rows += [(f"{label}: {what} CPU busy", f"{v:.1f} %", "> 85 %", v > 85)
                 for what, v in (("system", monitor.system), ("own process tree", monitor.tree))]
        rows.append((f"{label}: own tree waiting for a CPU", f"{monitor.wait:.1f} %", "", None))
    return wall, rows


def time_hooks(callback: StudyCallback) -> dict[str, tuple[float, str]]:
    """Time every ``on_*`` hook of ``callback`` that runs while trials do (what blocks Tune's
    controller; not ``on_experiment_end``, which waits for the last writes by design);
    returns hook name -> (longest call in s, name), filled while the study runs."""
    longest: dict[str, tuple[float, str]] = {}

    def timed(name: str, fn: Any) -> Any:
        def hook(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - started
                longest[name] = max(longest.get(name, (0.0, name)), (took, name))
        return hook

    for name in dir(callback):
        if name.startswith("on_") and name != "on_experiment_end" \
                and callable(getattr(callback, name)):
            setattr(callback, name, timed(name, getattr(callback, name)))
    return longest


def info(label: str, values: dict[str, float]) -> list[Row]:
    """Rows (in seconds) without a target."""
    return [(f"{label}: {k}", f"{v:.2f} s", "", None) for k, v in values.items()]


def overhead(args: argparse.Namespace, tmp: str) -> list[Row]:
    """Trivial trials: the plain-loop baseline, then studies with and without actor reuse."""
    start = time.perf_counter()
    spin(2_000_000)  # calibrate: the iterations of spin() that take about W seconds here
    iterations = max(1, int(2_000_000 * args.work_s / (time.perf_counter() - start)))
    start = time.perf_counter()
    for _ in range(args.trials):
        spin(iterations)
    work = (time.perf_counter() - start) / args.trials
    ideal = args.trials * work / CONCURRENCY
    rows = info("plain loop", {"work per trial W": work, f"ideal wall N*W/{CONCURRENCY}": ideal})
    trainable = tune.with_resources(tune.with_parameters(trivial_trial, iterations=iterations),
                                    {"cpu": 1, "gpu": 0})
    for reuse in (True, False):
        spec = make_spec(f"overhead-reuse-{reuse}".lower(), args.trials, tmp, real=False)
        wall, study_rows = run_study(f"reuse_actors={reuse}", spec, trainable, reuse=reuse)
        per = (wall - ideal) * CONCURRENCY / args.trials  # reuse False: not gating, "(< 1 s)"
        rows += [*study_rows, (f"reuse_actors={reuse}: overhead/trial = (wall - ideal)*2/N",
                               f"{per:.3f} s", f"< {TARGET_S} s" if reuse else
                               f"(< {TARGET_S} s)", per < TARGET_S)]
    return rows


def real(args: argparse.Namespace, tmp: str) -> list[Row]:
    """Real 1-epoch DP trials through ``runner.make_trainable``, with actor reuse."""
    spec = make_spec("overhead-real", args.real_trials, tmp, real=True)
    budget = noise_budget(spec, dataset_size(spec.dataset, seed=spec.seed))
    wall, rows = run_study("real", spec, runner.make_trainable(spec), reuse=True, budget=budget)
    trials = ResultsStore(spec.results_path, spec.name).trials().to_pylist()
    train = [r["wall_time_s"] for r in trials if r.get("wall_time_s") is not None] or [math.nan]
    mean, per = statistics.fmean(train), wall * CONCURRENCY / spec.trials
    return rows + info("real", {"wall per trial (wall*2/N)": per,
                                "training time in trial (wall_time_s), mean": mean,
                                "slot time beyond training, per trial": per - mean})


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure, print the table; 0 unless ``--check`` and a target fails."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="trivial trials (default 20)")
    parser.add_argument("--work-s", type=float, default=0.5, help="CPU work per trial, s")
    parser.add_argument("--real", action="store_true", help="also a study of real trials")
    parser.add_argument("--real-trials", type=int, default=4, help="real trials (default 4)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target fails")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.real_trials < 1 or args.work_s <= 0:
        parser.error("--trials and --real-trials must be >= 1, --work-s > 0")
    print(f"cpus {os.cpu_count()}, load average (1 min) {os.getloadavg()[0]:.2f} at start, "
          f"ray {ray.__version__}, optuna {optuna.__version__}", flush=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    cluster.init_ray()  # embedded, on 127.0.0.1
    rows = info("ray.init", {"embedded start (excluded)": time.perf_counter() - start})
    try:
        with tempfile.TemporaryDirectory(prefix="dpstudy-overhead-") as tmp:
            rows += overhead(args, tmp) + (real(args, tmp) if args.real else [])
    finally:
        ray.shutdown()
    rows.append(("load average (1 min) at the end", f"{os.getloadavg()[0]:.2f}", "", None))
    width, verdict = max(len(r[0]) for r in rows), {True: "PASS", False: "FAIL", None: ""}
    print(f"\n{'measurement':<{width}}  {'value':>10}  {'target':>7}  PASS/FAIL")
    for name, value, target, ok in rows:
        print(f"{name:<{width}}  {value:>10}  {target:>7}  {verdict[ok]}")
    return 1 if args.check and any(ok is False and t[0] != "(" for _, _, t, ok in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
