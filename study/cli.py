"""``dpstudy``: run, resume, follow, query and report DP hyperparameter studies.

Heavy libraries (torch, ray, optuna, pandas) are imported inside the command that needs
them, so ``dpstudy --help`` is instant. Exit codes: 0 success, 1 runtime failure,
2 invalid input (bad spec, bad filter, unknown study), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

DEFAULT_STORAGE = "~/dpstudy-runs"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""


def _ray_environment(address: str | None) -> None:
    """Settings Ray reads when it is imported, so they are set before that."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our own progress line instead
    # checkpoints every epoch force state snapshots on purpose (safe resume); no warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not address:  # the embedded Ray binds its node to loopback only
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def cmd_run(args: argparse.Namespace) -> int:
    """Validate a spec, then run the study on the embedded Ray (or ``--address``)."""
    _ray_environment(args.address)
    from study import runner

    spec, budget = runner.prepare(args.spec, cluster=bool(args.address))
    print(f"[{spec.name}] {spec.trials} trials at epsilon={spec.privacy.epsilon:g}, "
          f"delta={spec.privacy.delta:g}, selecting on {spec.objective.selection_split} "
          f"({', '.join(spec.objective.metrics)}); experiment {runner.experiment_dir(spec)}; "
          f"results {spec.results_path}", flush=True)
    code = _summarise(runner.run(spec, budget, address=args.address), spec)
    if spec.confirm is not None and code == EXIT_OK:
        return _confirm(runner, spec, spec.confirm.top, spec.confirm.seeds, None, args.address)
    return code


def cmd_confirm(args: argparse.Namespace) -> int:
    """Re-run the best configurations of a study with fresh seeds; print their intervals."""
    if args.top < 1 or args.seeds < 2:
        raise UsageError(f"--top must be >= 1 and --seeds >= 2 (got --top {args.top}, "
                         f"--seeds {args.seeds})")
    _ray_environment(args.address)
    from study import runner

    location = os.path.expanduser(args.results)
    if "://" not in location and not os.path.exists(location):
        location = _results_uri(args.results)
    spec = runner.find_spec(location, args.study)
    return _confirm(runner, spec, args.top, args.seeds, args.baseline, args.address)


def _confirm(runner: object, spec: object, top: int, seeds: int, baseline: str | None,
             address: str | None) -> int:
    from study.confirm import format_summary

    print(f"[{spec.name}] confirming the top {top} configuration(s) by "
          f"{spec.objective.primary[0]} with {seeds} fresh seeds each", flush=True)
    plan, summary = runner.confirm(spec, top=top, seeds=seeds, baseline=baseline,
                                   address=address)
    print(f"[{spec.name}] test accuracy over seeds {list(plan.seeds)} (95% t-intervals"
          + (f"; differences paired with baseline {plan.baseline['trial_id']})"
             if plan.baseline is not None else "; no baseline with prune 0, drop 0)"))
    print(format_summary(summary))
    missing = sum(row["seeds"] < len(plan.seeds) for row in summary)
    return EXIT_OK if not missing else EXIT_FAILED


def cmd_resume(args: argparse.Namespace) -> int:
    """Finish an interrupted study: ``resume NAME --storage DIR`` or ``resume DIR/NAME``."""
    if _is_jobs_address(args.address):  # the driver runs on the cluster, as a Ray Job
        from study import jobs

        job_id = jobs.submit_resume(args.study, args.address, python=args.python)
        print(f"submitted resume of {args.study} as job {job_id}")
        return EXIT_OK
    _ray_environment(args.address)
    from study import runner

    target = os.path.expanduser(args.study)
    if "://" not in target and not os.path.isdir(target):
        target = os.path.join(os.path.expanduser(args.storage), args.study)
        if not os.path.isdir(target):
            raise UsageError(f"study: no experiment directory {args.study!r} nor {target!r} "
                             f"(give DIR/NAME or NAME --storage DIR)")
    print(f"resuming {target}", flush=True)
    summary = runner.resume(target, address=args.address)
    return _summarise(summary, runner.read_spec(target))


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a study to a cluster as a Ray Job; returns at once with its id."""
    from study import jobs

    job_id, spec = jobs.submit(args.spec, args.address, python=args.python)
    print(job_id)
    print(f"[{spec.name}] submitted to {args.address}; Tune state {spec.storage}/{spec.name}, "
          f"results {spec.results}. Follow with: dpstudy logs {job_id} --address "
          f"{args.address}", file=sys.stderr)
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    """Print what a submitted study's driver printed."""
    from study import jobs

    print(jobs.logs(args.address, args.job_id), end="")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop a submitted study (finish it later with ``dpstudy resume``)."""
    from study import jobs

    stopped = jobs.stop(args.address, args.job_id)
    print(f"{args.job_id}: {'stopping' if stopped else 'not running'}")
    return EXIT_OK


def _is_jobs_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def cmd_status(args: argparse.Namespace) -> int:
    """One line per study under the storage root, or per submitted study (``--address``)."""
    if args.address:
        from study.status import submitted_statuses

        for line in submitted_statuses(args.address) or ["no studies submitted"]:
            print(line)
        return EXIT_OK
    from study.status import study_statuses

    rows = study_statuses(os.path.expanduser(args.storage))
    if not rows:
        print(f"no studies under {args.storage}")
        return EXIT_OK
    for line in rows:
        print(line)
    return EXIT_OK


def cmd_query(args: argparse.Namespace) -> int:
    """Filter, select, sort and print results (or their Pareto front)."""
    from study import query
    from study.results import read_epochs, read_trials

    uri = _results_uri(args.results)
    table = read_epochs(uri) if args.epochs else read_trials(uri)
    df = query.apply_filters(table, [query.parse_filter(w) for w in args.where])
    if args.pareto:
        df = query.pareto_front(df, query.parse_pareto(args.pareto))
    if args.sort:
        df = query.sort(df, args.sort.split(","), descending=args.desc)
    if args.limit:
        df = df.head(args.limit)
    if args.columns is None:  # the study's searched parameters, objectives, epsilon spent
        also = (args.sort.split(",") if args.sort else []) + (
            [c for c, _ in query.parse_pareto(args.pareto)] if args.pareto else [])
        df = query.select_columns(df, query.default_columns(df, also))
    elif args.columns != "all":
        df = query.select_columns(df, args.columns.split(","))
    print(query.format_table(df, args.format))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """PNG plots and an HTML or Markdown page for one study."""
    from study.report import build_report, render_markdown_summary
    from study.results import read_trials

    uri = _results_uri(args.results)
    out = args.out or (os.path.join(uri, "report") if "://" not in uri else "report")
    pareto = None
    if args.pareto:
        from study.query import parse_pareto

        pareto = parse_pareto(args.pareto)
    files = build_report(uri, out, pareto=pareto, fmt=args.format)
    print(render_markdown_summary(read_trials(uri)))
    print(f"report: {files.page}")
    for name, path in files.figures.items():
        print(f"  {name}: {path}")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of study spec files (for editors' YAML language server)."""
    import json

    from study.schema import spec_schema

    print(json.dumps(spec_schema(), indent=2))
    return EXIT_OK


def _results_uri(results: str) -> str:
    """A results directory/URI as given, or ``results/NAME`` for a bare study name."""
    if "://" in results or os.path.exists(os.path.expanduser(results)):
        return os.path.expanduser(results)
    named = os.path.join("results", results)
    if os.path.isdir(named):
        return named
    raise UsageError(f"results: no results directory {results!r} (nor {named!r})")


def _summarise(summary: object, spec: object) -> int:
    s = summary
    print(f"[{s.name}] finished: {s.completed} completed, {s.stopped} stopped early, "
          f"{s.failed} failed; results in {s.results}")
    if s.best:
        metric = spec.objective.primary[0]
        keys = dict.fromkeys(("trial_id", metric, "val_accuracy", "test_accuracy",
                              "epsilon_spent", "budget_used", "prune_rate", "drop_rate",
                              "clip_norm", "noise_multiplier", "learning_rate", "density"))
        print(f"  best by {metric} (selected on {spec.objective.selection_split}): "
              + ", ".join(f"{k}={_fmt(s.best.get(k))}" for k in keys))
    return EXIT_OK if s.completed + s.stopped > 0 or s.failed == 0 else EXIT_FAILED


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def build_parser() -> argparse.ArgumentParser:
    """The ``dpstudy`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="dpstudy", description="Hyperparameter studies for differentially private image "
        "classification with pre-pruning and gradient dropping, on Ray Tune + Optuna.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], text: str):
        p = sub.add_parser(name, help=text.replace("%", "%%"), description=text)
        p.set_defaults(fn=fn)
        return p

    p = add("run", cmd_run, "run a study from a YAML spec")
    p.add_argument("spec", help="study spec (YAML), e.g. examples/quickstart.yaml")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    p = add("submit", cmd_submit, "submit a study to a Ray cluster (returns its job id)")
    p.add_argument("spec", help="study spec (YAML)")
    p.add_argument("--address", required=True, help="Ray Jobs API, e.g. http://127.0.0.1:8265")
    p.add_argument("--python", default="python", help="interpreter with dpstudy's "
                   "dependencies on the head node (default: python on its PATH)")
    p = add("resume", cmd_resume, "finish an interrupted study")
    p.add_argument("study", help="experiment directory (STORAGE/NAME) or study NAME")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root for NAME")
    p.add_argument("--address", help="Ray cluster address; an http:// Jobs API address "
                   "submits the resume as a job (default: embedded local Ray)")
    p.add_argument("--python", default="python", help="with an http:// address: the head "
                   "node's interpreter with dpstudy's dependencies")
    p = add("status", cmd_status, "list studies (local storage root, or a cluster's jobs)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root")
    p.add_argument("--address", help="Ray Jobs API address: list submitted studies")
    p = add("logs", cmd_logs, "print a submitted study's output")
    p.add_argument("job_id", help="job id printed by submit")
    p.add_argument("--address", required=True, help="Ray Jobs API address")
    p = add("stop", cmd_stop, "stop a submitted study")
    p.add_argument("job_id", help="job id printed by submit")
    p.add_argument("--address", required=True, help="Ray Jobs API address")
    p = add("query", cmd_query, "filter, sort and print results")
    p.add_argument("results", help="results directory or URI, or a study name")
    p.add_argument("--where", action="append", default=[], metavar="EXPR",
                   help="filter such as 'epsilon==3' or 'prune_rate>0.5' (repeatable)")
    p.add_argument("--columns", help="comma-separated columns to show, or 'all' (default: "
                   "trial id, stage, status, searched parameters, objective metrics, test "
                   "accuracy, epsilon spent, budget used)")
    p.add_argument("--sort", help="comma-separated columns to sort by; "
                   "'--sort=-col' sorts descending")
    p.add_argument("--desc", action="store_true", help="sort descending")
    p.add_argument("--limit", type=int, help="show at most N rows")
    p.add_argument("--pareto", help="objectives of a Pareto front, e.g. accuracy,density")
    p.add_argument("--epochs", action="store_true", help="query epochs.parquet instead")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p = add("confirm", cmd_confirm, "re-run the best configurations with fresh seeds and "
            "print test accuracy with 95% intervals")
    p.add_argument("results", help="results directory or URI, study name, or experiment "
                   "directory (STORAGE/NAME)")
    p.add_argument("--top", type=int, default=1, help="how many configurations (default 1)")
    p.add_argument("--seeds", type=int, default=3, help="fresh seeds each (default 3)")
    p.add_argument("--baseline", metavar="TRIAL_ID", help="search trial to compare with "
                   "(default: the best one with prune rate 0 and drop rate 0, if any)")
    p.add_argument("--study", help="study name, when several share the results directory")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    p = add("report", cmd_report, "write PNG plots and an HTML/Markdown report")
    p.add_argument("results", help="results directory or URI, or a study name")
    p.add_argument("--out", help="output directory (default: RESULTS/report)")
    p.add_argument("--format", choices=("html", "md"), default="html")
    p.add_argument("--pareto", help="Pareto objectives (default accuracy,density)")
    add("schema", cmd_schema, "print the JSON Schema of study specs (editor completion: "
        "dpstudy schema > dpstudy-spec.schema.json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dpstudy`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted; continue with 'dpstudy resume'", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - map known error types to exit codes
        return _report_error(err)


def _report_error(err: Exception) -> int:
    from trainables.config import ConfigError

    if isinstance(err, (UsageError, ConfigError, FileNotFoundError, ValueError)):
        print(f"error: {err}" if not isinstance(err, ConfigError) else str(err),
              file=sys.stderr)
        return EXIT_USAGE
    if type(err).__name__ == "StudyExistsError":
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if type(err).__name__ == "ClusterError":
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    raise err


if __name__ == "__main__":
    sys.exit(main())
