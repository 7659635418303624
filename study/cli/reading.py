"""The commands that read a study: ``status``, ``query``, ``report`` and ``schema``."""

from __future__ import annotations

import argparse
import os

from study.cli.targets import DEFAULT_STORAGE, UsageError, results_uri, storage_problem
from trainables.errors import EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """One line per study under the storage root, or per submitted study (``--address``)."""
    from study.report.status import study_statuses, submitted_statuses

    if args.address:
        print("\n".join(submitted_statuses(args.address) or ["no studies submitted"]))
        return EXIT_OK
    storage = args.storage or DEFAULT_STORAGE
    problem = storage_problem(storage, given=args.storage is not None)
    if problem:
        raise UsageError(f"--storage: {problem} (got {storage!r})")
    print("\n".join(study_statuses(os.path.expanduser(storage))
                    or [f"no studies under {storage}"]))
    return EXIT_OK


def cmd_query(args: argparse.Namespace) -> int:
    """Filter, select, sort and print results (or their Pareto front)."""
    from study.analysis import query
    from study.storage.read import read_epochs, read_trials

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit: must be a positive number of rows (got {args.limit})")
    uri = results_uri(args.results)
    table = read_epochs(uri) if args.epochs else read_trials(uri)
    df = query.apply_filters(table, [query.parse_filter(w) for w in args.where])
    objectives = query.parse_pareto(args.pareto) if args.pareto else []
    if objectives:
        df = query.pareto_front(df, objectives)
    if args.sort:
        df = query.sort(df, args.sort.split(","), descending=args.desc)
    if args.limit is not None:
        df = df.head(args.limit)
    if args.columns is None:  # the study's searched parameters, objectives, epsilon spent
        also = (args.sort.split(",") if args.sort else []) + [c for c, _ in objectives]
        df = query.select_columns(df, query.default_columns(df, also))
    elif args.columns != "all":
        df = query.select_columns(df, args.columns.split(","))
    print(query.format_table(df, args.format))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """PNG plots and an HTML or Markdown page for one study."""
    from study.analysis.query import parse_pareto
    from study.report.html import build_report, render_markdown_summary
    from study.storage.read import read_trials

    uri = results_uri(args.results)
    out = args.out or (os.path.join(uri, "report") if "://" not in uri else "report")
    if "://" not in out and os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out: must be a directory, but {out!r} is a file")
    pareto = parse_pareto(args.pareto) if args.pareto else None
    files = build_report(uri, out, pareto=pareto, fmt=args.format)
    print(render_markdown_summary(read_trials(uri)))
    print(f"report: {files.page}")
    for name, path in files.figures.items():
        print(f"  {name}: {path}")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of study spec files (for editors' YAML language server)."""
    import json

    from study.spec.schema import spec_schema

    print(json.dumps(spec_schema(), indent=2))
    return EXIT_OK
