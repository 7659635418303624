"""``dpstudy``: run, resume, follow, query and report DP hyperparameter studies.

Heavy libraries (torch, ray, optuna, pandas) are imported inside the command that needs
them, so ``dpstudy --help`` is instant. Exit codes: 0 success, 1 runtime failure,
2 invalid input (bad spec, bad filter, unknown study), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from study.cli import privacy, reading, running
from study.cli.targets import DEFAULT_STORAGE
from trainables.errors import EXIT_INTERRUPTED, EXIT_USAGE, DpstudyError


def arg(*flags: str, **kwargs: object) -> tuple[tuple[str, ...], dict[str, object]]:
    """One ``add_argument`` call of :data:`COMMANDS`, as data."""
    return flags, kwargs


_RAY = arg("--address", help="Ray cluster address (default: embedded local Ray)")
_STUDY = arg("--study", help="study name, when several share the results directory")
_RESULTS = arg("results", help="results directory or URI, or a study name")
_JOB = (arg("job_id", help="job id printed by submit"),
        arg("--address", required=True, help="Ray Jobs API address"))

#: command -> (function, help, its arguments...), in ``dpstudy --help`` order
COMMANDS: dict[str, tuple] = {
    "run": (running.cmd_run, "run a study from a YAML spec",
        arg("spec", help="study spec (YAML), e.g. examples/quickstart.yaml"), _RAY),
    "submit": (running.cmd_submit, "submit a study to a Ray cluster (returns its job id)",
        arg("spec", help="study spec (YAML)"),
        arg("--address", required=True, help="Ray Jobs API, e.g. http://127.0.0.1:8265"),
        arg("--python", default="python", help="interpreter with dpstudy's dependencies on the "
            "head node (default: python on its PATH)")),
    "resume": (running.cmd_resume, "finish an interrupted study",
        arg("study", help="experiment directory (STORAGE/NAME) or study NAME"),
        arg("--storage", default=DEFAULT_STORAGE, help="storage root for NAME"),
        arg("--address", help="Ray cluster address; an http:// Jobs API address submits the "
            "resume as a job (default: embedded local Ray)"),
        arg("--python", default="python", help="with an http:// address: the head node's "
            "interpreter with dpstudy's dependencies")),
    "status": (reading.cmd_status, "list studies (local storage root, or a cluster's jobs)",
        arg("--storage", help=f"storage root (default {DEFAULT_STORAGE})"),
        arg("--address", help="Ray Jobs API address: list submitted studies")),
    "logs": (running.cmd_logs, "print a submitted study's output", *_JOB),
    "stop": (running.cmd_stop, "stop a submitted study", *_JOB),
    "query": (reading.cmd_query, "filter, sort and print results", _RESULTS,
        arg("--where", action="append", default=[], metavar="EXPR",
            help="filter such as 'epsilon==3' or 'prune_rate>0.5' (repeatable)"),
        arg("--columns", help="comma-separated columns to show, or 'all' (default: trial id, "
            "stage, status, searched parameters, objective metrics, test accuracy, epsilon "
            "spent, budget used)"),
        arg("--sort", help="comma-separated columns to sort by; '--sort=-col' sorts descending"),
        arg("--desc", action="store_true", help="sort descending"),
        arg("--limit", type=int, help="show at most N rows"),
        arg("--pareto", help="objectives of a Pareto front, e.g. accuracy,density"),
        arg("--epochs", action="store_true", help="query epochs.parquet instead"),
        arg("--format", choices=("table", "csv", "json"), default="table")),
    "confirm": (running.cmd_confirm, "re-run the best configurations with fresh seeds and "
                "print test accuracy with 95% intervals",
        arg("results", help="results directory or URI, study name, or experiment directory "
            "(STORAGE/NAME)"),
        arg("--top", type=int, default=1, help="how many configurations (default 1)"),
        arg("--seeds", type=int, default=3, help="fresh seeds each (default 3)"),
        arg("--baseline", metavar="TRIAL_ID", help="search trial to compare with (default: the "
            "best one with prune rate 0 and drop rate 0, if any)"), _STUDY, _RAY),
    "release": (privacy.cmd_release, "write only what a private-selection study's guarantee "
                "covers: chosen configuration, weights, DP score, study epsilon",
        _RESULTS, arg("--out", required=True, help="new or empty output directory"), _STUDY,
        arg("--experiment", help="experiment directory STORAGE/NAME (default: from the spec)")),
    "report": (reading.cmd_report, "write PNG plots and an HTML/Markdown report",
        _RESULTS, arg("--out", help="output directory (default: RESULTS/report)"),
        arg("--format", choices=("html", "md"), default="html"),
        arg("--pareto", help="Pareto objectives (default accuracy,density)")),
    "audit": (privacy.cmd_audit, "empirical privacy audit of a trial (one training run with "
              "canaries): claimed vs audited epsilon, stored in audits.parquet",
        arg("target", help="study spec (YAML), or results directory/URI, study name or "
            "experiment directory (STORAGE/NAME)"),
        arg("--trial", help="trial id to audit (from the study's results)"),
        arg("--best", action="store_true", help="audit the best completed trial"),
        arg("--canaries", type=int, default=1000, help="number of canaries m (default 1000)"),
        arg("--confidence", type=float, default=0.95,
            help="confidence of the lower bound (default 0.95)"),
        arg("--mode", choices=("white-box", "black-box"), default="white-box"),
        arg("--seed", type=int, default=0, help="seed of the canary draw"), _STUDY, _RAY),
    "schema": (reading.cmd_schema, "print the JSON Schema of study specs (editor completion: "
               "dpstudy schema > dpstudy-spec.schema.json)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``dpstudy`` argument parser, from :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="dpstudy", description="Hyperparameter studies for differentially private image "
        "classification with pre-pruning and gradient dropping, on Ray Tune + Optuna.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, text, *arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=text.replace("%", "%%"), description=text)
        p.set_defaults(fn=fn)
        for flags, kwargs in arguments:
            p.add_argument(*flags, **kwargs)
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
