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

from trainables.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    DpstudyError,
    InputError,
)

DEFAULT_STORAGE = "~/dpstudy-runs"


class UsageError(InputError):
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
    from study.spec.model import load_spec
    from study.storage.locations import check_locations, resolve_paths

    # structural checks and writable locations first: a bad spec never imports Ray or torch
    check_locations(resolve_paths(load_spec(args.spec)))
    _ray_environment(args.address)
    from study.execution import runner
    from study.storage import experiment

    spec, budget = runner.prepare(args.spec, cluster=bool(args.address))
    from study.spec.selection import selection_label

    _print_study_budget(spec)
    print(f"[{spec.name}] {spec.trials or 'a drawn number of'} trials at epsilon="
          f"{spec.privacy.epsilon:g}, "
          f"delta={spec.privacy.delta:g}, selecting on {spec.objective.selection_split} "
          f"({selection_label(spec)}); experiment {experiment.experiment_dir(spec)}; "
          f"results {spec.results_path}", flush=True)
    summary = runner.run(spec, budget, address=args.address)
    return _then_confirm(runner, spec, summary, args.address)


def _then_confirm(runner: object, spec: object, summary: object, address: str | None) -> int:
    """Summarise a search; run the spec's ``confirm:`` once the search has every trial (an
    interrupted search is not confirmed: resume it first)."""
    code = _summarise(summary, spec)
    done = summary.completed + summary.stopped + summary.failed
    finished = spec.trials is None or done >= spec.trials  # None: drawn (private selection)
    if spec.confirm is not None and code == EXIT_OK:
        if not finished:
            print(f"[{spec.name}] the search is unfinished; 'dpstudy resume "
                  f"{summary.experiment}' finishes it and then confirms", file=sys.stderr)
            return EXIT_INTERRUPTED
        return _confirm(runner, spec, spec.confirm.top, spec.confirm.seeds, None, address)
    return code


def _print_study_budget(spec: object) -> None:
    """Per-trial vs study budget, before running (scope: study or private selection)."""
    from study.privacy import private_selection

    s = spec
    n = private_selection.train_size(s)
    budget = private_selection.plan_study_budget(s, n)
    if budget is not None:
        print(f"[{s.name}] {budget.describe(s)}", flush=True)
    elif s.selection.private:
        t = s.selection.trials
        bound = "n/a (" + "; ".join(private_selection.assumptions(s, [])) + ")"
        if not private_selection.assumptions(s, []):
            value = private_selection.selection_epsilon(
                private_selection.possible_mechanisms(s, n), mean=t.mean,
                shape=t.event_shape, delta=s.privacy.delta)
            bound = f"{value:.3f}"
        print(f"[{s.name}] per trial epsilon={s.privacy.epsilon:g}; study (only the selected "
              f"result released) epsilon {bound}, delta={s.privacy.delta:g}", flush=True)


def cmd_release(args: argparse.Namespace) -> int:
    """Write only what a private-selection study's guarantee covers."""
    from study.privacy.release import release
    from study.storage import experiment
    from study.storage.read import read_trials

    results = _results_uri(args.results)
    spec = experiment.find_spec(results, args.study)
    rows = [r for r in read_trials(results).to_pylist() if r.get("study") == spec.name]
    experiment = os.path.expanduser(args.experiment or experiment.experiment_dir(spec))
    done = release(spec, rows, results, args.out, experiment=experiment)
    print(f"[{spec.name}] released trial {done.trial_id} (DP score {done.score:.4f}) at "
          f"study epsilon {done.epsilon:.3f}, delta {done.delta:g} into {done.directory}; "
          f"see PRIVATE.txt for what must stay private")
    return EXIT_OK


def cmd_confirm(args: argparse.Namespace) -> int:
    """Re-run the best configurations of a study with fresh seeds; print their intervals."""
    if not 1 <= args.top <= 100 or not 2 <= args.seeds <= 100:
        raise UsageError(f"--top must be in [1, 100] and --seeds in [2, 100] (got --top "
                         f"{args.top}, --seeds {args.seeds})")
    _ray_environment(args.address)
    import dataclasses

    from study.execution import runner
    from study.storage import experiment

    location = os.path.expanduser(args.results)
    if "://" not in location and not os.path.exists(location):
        location = _results_uri(args.results)
    spec = experiment.find_spec(location, args.study)
    if not experiment.is_experiment_dir(location):  # rows live where the user pointed
        location = location if "://" in location else os.path.abspath(location)
        spec = dataclasses.replace(spec, results=location)
    return _confirm(runner, spec, args.top, args.seeds, args.baseline, args.address)


def _confirm(runner: object, spec: object, top: int, seeds: int, baseline: str | None,
             address: str | None) -> int:
    from study.analysis.confirm import format_summary

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
        from study.execution import jobs

        job_id = jobs.submit_resume(args.study, args.address, python=args.python)
        print(f"submitted resume of {args.study} as job {job_id}")
        return EXIT_OK
    target = _experiment_target(args.study, args.storage)
    _ray_environment(args.address)
    from study.execution import runner
    from study.storage import experiment

    spec = experiment.read_spec(target)  # refuses a directory that holds no study
    print(f"resuming {target}", flush=True)
    summary = runner.resume(target, address=args.address)
    return _then_confirm(runner, spec, summary, args.address)


def _experiment_target(study: str, storage: str) -> str:
    """The experiment directory ``study`` (a path, relative ones made absolute: Tune takes
    only absolute paths and URIs) or ``storage/study``, preferring one with a saved spec;
    a :class:`UsageError` if neither is a directory, before Ray starts."""
    from study.storage.experiment import SPEC_FILE
    from study.storage.locations import resolve_location

    if "://" in study:
        return study
    candidates = list(dict.fromkeys([
        resolve_location(study), resolve_location(os.path.join(os.path.expanduser(storage),
                                                               study))]))
    for target in candidates:
        if os.path.isfile(os.path.join(target, SPEC_FILE)):
            return target
    folders = [c for c in candidates if os.path.isdir(c)]
    if folders:  # not an experiment directory: resume says so, naming it
        return folders[0]
    tried = " nor ".join(repr(c) for c in candidates)
    raise UsageError(f"study: no experiment directory {tried} (give DIR/NAME or NAME "
                     f"--storage DIR) (got {study!r})")


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a study to a cluster as a Ray Job; returns at once with its id."""
    from study.execution import jobs

    job_id, spec = jobs.submit(args.spec, args.address, python=args.python)
    print(job_id)
    print(f"[{spec.name}] submitted to {args.address}; Tune state {spec.storage}/{spec.name}, "
          f"results {spec.results}. Follow with: dpstudy logs {job_id} --address "
          f"{args.address}", file=sys.stderr)
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    """Print what a submitted study's driver printed."""
    from study.execution import jobs

    print(jobs.logs(args.address, args.job_id), end="")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop a submitted study (finish it later with ``dpstudy resume``)."""
    from study.execution import jobs

    stopped = jobs.stop(args.address, args.job_id)
    print(f"{args.job_id}: {'stopping' if stopped else 'not running'}")
    return EXIT_OK


def _is_jobs_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def cmd_status(args: argparse.Namespace) -> int:
    """One line per study under the storage root, or per submitted study (``--address``)."""
    if args.address:
        from study.report.status import submitted_statuses

        for line in submitted_statuses(args.address) or ["no studies submitted"]:
            print(line)
        return EXIT_OK
    from study.report.status import study_statuses

    storage = args.storage or DEFAULT_STORAGE
    problem = _storage_problem(storage, given=args.storage is not None)
    if problem:
        raise UsageError(f"--storage: {problem} (got {storage!r})")
    rows = study_statuses(os.path.expanduser(storage))
    if not rows:
        print(f"no studies under {storage}")
        return EXIT_OK
    for line in rows:
        print(line)
    return EXIT_OK


def _storage_problem(storage: str, *, given: bool) -> str | None:
    """Why the local storage root ``storage`` cannot be listed, or None. The default root
    may not exist yet (no study has run); one the user names must."""
    path = os.path.expanduser(storage)
    if "://" in storage:
        return "status lists a local storage root; give a directory path"
    if os.path.isdir(path):
        return None if os.access(path, os.R_OK | os.X_OK) else "cannot read that directory"
    if os.path.exists(path):
        return "is not a directory"
    return "no such directory" if given else None


def cmd_query(args: argparse.Namespace) -> int:
    """Filter, select, sort and print results (or their Pareto front)."""
    from study.analysis import query
    from study.storage.read import read_epochs, read_trials

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit: must be a positive number of rows (got {args.limit})")
    uri = _results_uri(args.results)
    table = read_epochs(uri) if args.epochs else read_trials(uri)
    df = query.apply_filters(table, [query.parse_filter(w) for w in args.where])
    if args.pareto:
        df = query.pareto_front(df, query.parse_pareto(args.pareto))
    if args.sort:
        df = query.sort(df, args.sort.split(","), descending=args.desc)
    if args.limit is not None:
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
    from study.report.html import build_report, render_markdown_summary
    from study.storage.read import read_trials

    uri = _results_uri(args.results)
    out = args.out or (os.path.join(uri, "report") if "://" not in uri else "report")
    if "://" not in out and os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out: must be a directory, but {out!r} is a file")
    pareto = None
    if args.pareto:
        from study.analysis.query import parse_pareto

        pareto = parse_pareto(args.pareto)
    files = build_report(uri, out, pareto=pareto, fmt=args.format)
    print(render_markdown_summary(read_trials(uri)))
    print(f"report: {files.page}")
    for name, path in files.figures.items():
        print(f"  {name}: {path}")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    """Empirical privacy audit of one trial's mechanism: claimed vs audited epsilon."""
    from study.execution import audit
    from trainables.audit import AuditConfig

    if args.trial and args.best:
        raise UsageError("audit: give at most one of --trial ID and --best")
    settings = AuditConfig(canaries=args.canaries, confidence=args.confidence,
                           mode=args.mode, seed=args.seed)
    where = args.target
    if not where.endswith((".yaml", ".yml")):
        where = _results_uri(where)  # a results directory, URI or study name
    target = audit.resolve(where, trial=args.trial, best=args.best, study=args.study)
    audit.prepare(target)
    _ray_environment(args.address)
    row = audit.record(target, settings, audit.run_remote(target, settings,
                                                          address=args.address))
    print(audit.format_row(row))
    return EXIT_FAILED if row["violation"] else EXIT_OK  # a broken mechanism fails a CI job


def cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of study spec files (for editors' YAML language server)."""
    import json

    from study.spec.schema import spec_schema

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
        from study.spec import hyperparameters
        from study.spec.selection import selection_metric

        metric = selection_metric(spec)[0]
        keys = dict.fromkeys(("trial_id", metric, "val_accuracy", "test_accuracy",
                              "epsilon_spent", "budget_used",
                              *hyperparameters.names(summarised=True), "density"))
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
    p.add_argument("--storage", help=f"storage root (default {DEFAULT_STORAGE})")
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
    p = add("release", cmd_release, "write only what a private-selection study's "
            "guarantee covers: chosen configuration, weights, DP score, study epsilon")
    p.add_argument("results", help="results directory or URI, or a study name")
    p.add_argument("--out", required=True, help="new or empty output directory")
    p.add_argument("--study", help="study name, when several share the results directory")
    p.add_argument("--experiment", help="experiment directory STORAGE/NAME (default: from "
                   "the spec)")
    p = add("report", cmd_report, "write PNG plots and an HTML/Markdown report")
    p.add_argument("results", help="results directory or URI, or a study name")
    p.add_argument("--out", help="output directory (default: RESULTS/report)")
    p.add_argument("--format", choices=("html", "md"), default="html")
    p.add_argument("--pareto", help="Pareto objectives (default accuracy,density)")
    p = add("audit", cmd_audit, "empirical privacy audit of a trial (one training run with "
            "canaries): claimed vs audited epsilon, stored in audits.parquet")
    p.add_argument("target", help="study spec (YAML), or results directory/URI, study name "
                   "or experiment directory (STORAGE/NAME)")
    p.add_argument("--trial", help="trial id to audit (from the study's results)")
    p.add_argument("--best", action="store_true", help="audit the best completed trial")
    p.add_argument("--canaries", type=int, default=1000, help="number of canaries m "
                   "(default 1000)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the "
                   "lower bound (default 0.95)")
    p.add_argument("--mode", choices=("white-box", "black-box"), default="white-box")
    p.add_argument("--seed", type=int, default=0, help="seed of the canary draw")
    p.add_argument("--study", help="study name, when several share the results directory")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    add("schema", cmd_schema, "print the JSON Schema of study specs (editor completion: "
        "dpstudy schema > dpstudy-spec.schema.json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dpstudy`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt as err:
        # a StudyInterruptedError says which directory to resume; a bare Ctrl-C (before
        # any trial started) has nothing to resume
        print(str(err) or "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - map known error types to exit codes
        return _report_error(err)


def _report_error(err: Exception) -> int:
    """Print a user-facing error as one message and return its exit code (by its type:
    :class:`~trainables.errors.DpstudyError` names its own); anything else is a bug and
    keeps its traceback."""
    if isinstance(err, DpstudyError):
        print(err.user_message(), file=sys.stderr)
        return err.exit_code
    if isinstance(err, (FileNotFoundError, ValueError)):  # bad input met by a library
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    raise err


if __name__ == "__main__":
    sys.exit(main())
