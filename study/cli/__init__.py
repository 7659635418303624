"""``dpstudy``: run, resume, follow, query and report DP hyperparameter studies.

Heavy libraries (torch, ray, optuna, pandas) are imported inside the command that needs
them, so ``dpstudy --help`` is instant. Exit codes: 0 success, 1 runtime failure,
2 invalid input (bad spec, bad filter, unknown study), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from study.cli import privacy, reading, running
from study.cli.targets import DEFAULT_STORAGE
from trainables.errors import EXIT_INTERRUPTED, EXIT_USAGE, DpstudyError


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

    p = add("run", running.cmd_run, "run a study from a YAML spec")
    p.add_argument("spec", help="study spec (YAML), e.g. examples/quickstart.yaml")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    p = add("submit", running.cmd_submit, "submit a study to a Ray cluster (returns its job id)")
    p.add_argument("spec", help="study spec (YAML)")
    p.add_argument("--address", required=True, help="Ray Jobs API, e.g. http://127.0.0.1:8265")
    p.add_argument("--python", default="python", help="interpreter with dpstudy's "
                   "dependencies on the head node (default: python on its PATH)")
    p = add("resume", running.cmd_resume, "finish an interrupted study")
    p.add_argument("study", help="experiment directory (STORAGE/NAME) or study NAME")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root for NAME")
    p.add_argument("--address", help="Ray cluster address; an http:// Jobs API address "
                   "submits the resume as a job (default: embedded local Ray)")
    p.add_argument("--python", default="python", help="with an http:// address: the head "
                   "node's interpreter with dpstudy's dependencies")
    p = add("status", reading.cmd_status, "list studies (local storage root, or a cluster's jobs)")
    p.add_argument("--storage", help=f"storage root (default {DEFAULT_STORAGE})")
    p.add_argument("--address", help="Ray Jobs API address: list submitted studies")
    p = add("logs", running.cmd_logs, "print a submitted study's output")
    p.add_argument("job_id", help="job id printed by submit")
    p.add_argument("--address", required=True, help="Ray Jobs API address")
    p = add("stop", running.cmd_stop, "stop a submitted study")
    p.add_argument("job_id", help="job id printed by submit")
    p.add_argument("--address", required=True, help="Ray Jobs API address")
    p = add("query", reading.cmd_query, "filter, sort and print results")
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
    p = add("confirm", running.cmd_confirm, "re-run the best configurations with fresh seeds and "
            "print test accuracy with 95% intervals")
    p.add_argument("results", help="results directory or URI, study name, or experiment "
                   "directory (STORAGE/NAME)")
    p.add_argument("--top", type=int, default=1, help="how many configurations (default 1)")
    p.add_argument("--seeds", type=int, default=3, help="fresh seeds each (default 3)")
    p.add_argument("--baseline", metavar="TRIAL_ID", help="search trial to compare with "
                   "(default: the best one with prune rate 0 and drop rate 0, if any)")
    p.add_argument("--study", help="study name, when several share the results directory")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    p = add("release", privacy.cmd_release, "write only what a private-selection study's "
            "guarantee covers: chosen configuration, weights, DP score, study epsilon")
    p.add_argument("results", help="results directory or URI, or a study name")
    p.add_argument("--out", required=True, help="new or empty output directory")
    p.add_argument("--study", help="study name, when several share the results directory")
    p.add_argument("--experiment", help="experiment directory STORAGE/NAME (default: from "
                   "the spec)")
    p = add("report", reading.cmd_report, "write PNG plots and an HTML/Markdown report")
    p.add_argument("results", help="results directory or URI, or a study name")
    p.add_argument("--out", help="output directory (default: RESULTS/report)")
    p.add_argument("--format", choices=("html", "md"), default="html")
    p.add_argument("--pareto", help="Pareto objectives (default accuracy,density)")
    p = add("audit", privacy.cmd_audit, "empirical privacy audit of a trial (one training run with "
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
    add("schema", reading.cmd_schema, "print the JSON Schema of study specs (editor completion: "
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
        return report_error(err)


def report_error(err: Exception) -> int:
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
