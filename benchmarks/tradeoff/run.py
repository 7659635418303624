"""Run (or continue) the trade-off benchmark and write docs/RESULTS.md.

    python benchmarks/tradeoff/run.py                       # the full design, resumable
    python benchmarks/tradeoff/run.py --scale smoke         # minutes: checks the pipeline
    python benchmarks/tradeoff/run.py --report-only         # rewrite RESULTS.md from results
    python benchmarks/tradeoff/run.py --address ray://head:10001 --cpus-per-trial 4 \\
        --concurrent 8 --widths 1,4,8                       # on a cluster

Every study is a dpstudy study (search on validation, then ``confirm`` of its best
configuration over fresh seeds). Its Parquet results live in
``benchmarks/tradeoff/results/<study>`` (small; commit them), its Ray Tune state under
``--storage`` (default ``~/dpstudy-runs/tradeoff``). Run the command again after an
interruption: finished studies are skipped, an unfinished search is resumed from its Tune
state (or, on a machine without it, run again from scratch), and ``confirm`` runs only the
seeds that have no result yet. See benchmarks/tradeoff/studies.py for the design.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import studies  # noqa: E402  (this folder, not a package)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"  # --results changes it (a smoke run writes to a scratch folder)


class PlainDumper(yaml.SafeDumper):
    """Writes a value shared by two keys out twice: dpstudy refuses YAML anchors."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (the knobs to scale the benchmark up)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(studies.SCALES), default="full")
    p.add_argument("--widths", default="1,4", help="CNN width multipliers (default 1,4)")
    p.add_argument("--storage", help="Tune state root (default ~/dpstudy-runs/tradeoff, "
                   "or ~/dpstudy-runs/tradeoff-smoke for --scale smoke)")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--concurrent", type=int, default=2, help="trials at once per study")
    p.add_argument("--report-only", action="store_true", help="only rewrite RESULTS.md")
    p.add_argument("--with-benchmarks", action="store_true", help="also run step_cost.py and "
                   "study_overhead.py and put their tables (with the machine) in RESULTS.md")
    p.add_argument("--results", help="Parquet results root (default benchmarks/tradeoff/"
                   "results; for --scale smoke a folder under /tmp)")
    p.add_argument("--out", help="results page (default docs/RESULTS.md; for --scale smoke "
                   "RESULTS.md in the results root)")
    return p.parse_args(argv)


def _trials(results: Path, name: str) -> list[dict]:
    from study.storage.read import read_trials

    try:
        return [r for r in read_trials(str(results)).to_pylist() if r["study"] == name]
    except FileNotFoundError:
        return []


def search_done(rows: list[dict], trials: int) -> bool:
    """Whether a study's search recorded all its trials."""
    return sum(1 for r in rows if r.get("stage") in (None, "search")) >= trials


def run_study(study: studies.Study, args: argparse.Namespace,
              fixed: dict[str, float] | None = None) -> None:
    """Search (run, resume, or redo without Tune state), then confirm; times each part."""
    from study.execution import runner
    from study.storage import experiment as experiment_files

    scale = studies.SCALES[args.scale]
    trials = studies.trials(study, scale)
    storage = os.path.expanduser(args.storage)
    results = RESULTS / study.name
    spec_data = studies.spec(study, scale, storage=storage, results=str(results),
                             cpus_per_trial=args.cpus_per_trial, concurrent=args.concurrent,
                             fixed=fixed)
    experiment = Path(storage) / study.name
    started = time.perf_counter()
    if not search_done(_trials(results, study.name), trials):
        if (experiment / "dpstudy-spec.yaml").exists():
            saved = experiment_files.read_spec(str(experiment))
            if (saved.trials, saved.search.max_epochs.value, saved.dataset.name) != (
                    trials, scale.max_epochs, spec_data["dataset"]["name"]):
                raise SystemExit(f"error: {experiment} holds a study of another design "
                                 f"({saved.trials} trials, {saved.dataset.name}); remove it or "
                                 f"pass another --storage")
            print(f"[bench] resuming the search of {study.name}", flush=True)
            runner.resume(str(experiment), address=args.address)
        else:
            print(f"[bench] searching {study.name}", flush=True)
            shutil.rmtree(results, ignore_errors=True)  # partial rows without Tune state
            path = Path(storage) / f"{study.name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.dump(spec_data, Dumper=PlainDumper, sort_keys=False))
            spec, budget = runner.prepare(str(path), cluster=bool(args.address))
            runner.run(spec, budget, address=args.address)
    if not search_done(_trials(results, study.name), trials):
        raise SystemExit(f"[bench] the search of {study.name} was interrupted; run the "
                         f"benchmark again to continue it")
    spec = experiment_files.find_spec(str(results), study.name)
    print(f"[bench] confirming {study.name} over {scale.seeds} seeds", flush=True)
    runner.confirm(spec, top=1, seeds=scale.seeds, address=args.address)
    record_time(study.name, time.perf_counter() - started)


def record_time(name: str, seconds: float) -> None:
    """Add ``seconds`` of wall time to study ``name`` in the timings file (atomic)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[name] = timings.get(name, 0.0) + seconds
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(timings, indent=1, sort_keys=True))
    os.replace(tmp, path)


def run_benchmarks() -> None:
    """Run the speed benchmarks and keep their tables, with the machine, for RESULTS.md."""
    import platform
    import subprocess

    machine = (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} "
               f"CPUs, {platform.platform()}, Python {platform.python_version()}")
    for name, extra in (("step_cost", ["--data", "shared"]), ("study_overhead", [])):
        done = subprocess.run([sys.executable, str(HERE.parent / f"{name}.py"), *extra],
                              capture_output=True, text=True, cwd=studies.REPO, check=False)
        text = f"{machine}\n$ python benchmarks/{name}.py {' '.join(extra)}\n{done.stdout}"
        (RESULTS / f"bench-{name}.txt").write_text(text)


def is_done(study: studies.Study, scale: studies.Scale) -> bool:
    """Whether a study's search and confirmation are both recorded."""
    rows = _trials(RESULTS / study.name, study.name)
    confirmed = [r for r in rows if r.get("stage") == "confirm" and r["status"] == "completed"]
    return search_done(rows, studies.trials(study, scale)) and len(confirmed) >= scale.seeds


def main(argv: list[str] | None = None) -> int:
    """Run what is unfinished, then write the results page."""
    global RESULTS
    args = parse_args(argv)
    smoke = args.scale == "smoke"
    RESULTS = Path(args.results or ("/tmp/dpstudy-tradeoff-smoke" if smoke else RESULTS))
    args.storage = args.storage or f"~/dpstudy-runs/tradeoff{'-smoke' if smoke else ''}"
    out = Path(args.out or (RESULTS / "RESULTS.md" if smoke else
                            studies.REPO / "docs" / "RESULTS.md"))
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    widths = [float(w) for w in args.widths.split(",")]
    scale = studies.SCALES[args.scale]
    import report

    if not args.report_only:
        if not scale.subset and not studies.SHARED_MNIST.is_dir():
            print(f"error: {studies.SHARED_MNIST} is missing (the benchmark's training data)",
                  file=sys.stderr)
            return 2
        for study in studies.stage1(widths):
            if not is_done(study, scale):
                run_study(study, args)
        best = report.best_arm(RESULTS, widths, scale)
        for study in studies.stage2(widths, best):
            if not is_done(study, scale):
                run_study(study, args)
        chosen = report.chosen_hyper(RESULTS, studies.Study(best, max(widths), 3.0), widths)
        control = studies.control(widths)
        if chosen and not is_done(control, scale):
            run_study(control, args, fixed=chosen)
    if args.with_benchmarks:
        run_benchmarks()
    page = report.write(RESULTS, out, widths, scale)
    print(f"[bench] wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
