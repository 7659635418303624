"""The commands that run trials: ``run``, ``resume``, ``confirm`` (on the embedded Ray or
a cluster) and ``submit``, ``logs``, ``stop`` (a study as a Ray Job)."""

from __future__ import annotations

import argparse
import os
import sys

from study.cli.targets import UsageError, experiment_target, results_uri
from trainables.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK


def ray_environment(address: str | None) -> None:
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
    ray_environment(args.address)
    from study.execution import runner
    from study.storage import experiment

    spec, budget = runner.prepare(args.spec, cluster=bool(args.address))
    from study.spec.selection import selection_label

    _print_study_budget(spec)
    print(f"[{spec.name}] {spec.trials or 'a drawn number of'} trials at epsilon="
          f"{spec.privacy.epsilon:g}, delta={spec.privacy.delta:g}, selecting on "
          f"{spec.objective.selection_split} ({selection_label(spec)}); experiment "
          f"{experiment.experiment_dir(spec)}; results {spec.results_path}", flush=True)
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
    from study.privacy import private_selection as ps

    n = ps.train_size(spec)
    budget = ps.plan_study_budget(spec, n)
    if budget is not None:
        print(f"[{spec.name}] {budget.describe(spec)}", flush=True)
    elif spec.selection.private:
        t, failed = spec.selection.trials, ps.assumptions(spec, [])
        epsilon = None if failed else ps.selection_epsilon(
            ps.possible_mechanisms(spec, n), mean=t.mean, shape=t.event_shape,
            delta=spec.privacy.delta)
        bound = "n/a (" + "; ".join(failed) + ")" if failed else f"{epsilon:.3f}"
        print(f"[{spec.name}] per trial epsilon={spec.privacy.epsilon:g}; study (only the "
              f"selected result released) epsilon {bound}, delta={spec.privacy.delta:g}",
              flush=True)


def cmd_confirm(args: argparse.Namespace) -> int:
    """Re-run the best configurations of a study with fresh seeds; print their intervals."""
    if not 1 <= args.top <= 100 or not 2 <= args.seeds <= 100:
        raise UsageError(f"--top must be in [1, 100] and --seeds in [2, 100] (got --top "
                         f"{args.top}, --seeds {args.seeds})")
    ray_environment(args.address)
    from study.execution import runner
    from study.storage import experiment

    location = results_uri(args.results)
    spec = experiment.find_spec(location, args.study)
    if not experiment.is_experiment_dir(location):  # rows live where the user pointed
        location = location if "://" in location else os.path.abspath(location)
        spec = spec.model_copy(update={"results": location})
    return _confirm(runner, spec, args.top, args.seeds, args.baseline, args.address)


def _confirm(runner: object, spec: object, top: int, seeds: int, baseline: str | None,
             address: str | None) -> int:
    import pandas as pd

    from study.analysis.query import format_table

    print(f"[{spec.name}] confirming the top {top} configuration(s) by "
          f"{spec.objective.primary[0]} with {seeds} fresh seeds each", flush=True)
    plan, summary = runner.confirm(spec, top=top, seeds=seeds, baseline=baseline,
                                   address=address)
    if len(plan.top_ids) < top:  # trials stopped early spent less than the target epsilon
        print(f"[{spec.name}] only {len(plan.top_ids)} search trial(s) completed (the others "
              f"stopped early or failed), so {len(plan.top_ids)} configuration(s) confirmed",
              flush=True)
    print(f"[{spec.name}] test accuracy over seeds {list(plan.seeds)} (95% t-intervals"
          + (f"; differences paired with baseline {plan.baseline['trial_id']})"
             if plan.baseline is not None else "; no baseline with prune 0, drop 0)"))
    print(format_table(pd.DataFrame(summary), "table"))
    missing = sum(row["seeds"] < len(plan.seeds) for row in summary)
    return EXIT_OK if not missing else EXIT_FAILED


def cmd_resume(args: argparse.Namespace) -> int:
    """Finish an interrupted study: ``resume NAME --storage DIR`` or ``resume DIR/NAME``."""
    if (args.address or "").startswith(("http://", "https://")):  # the driver runs as a Ray Job
        from study.execution import jobs

        job_id = jobs.submit_resume(args.study, args.address, python=args.python)
        print(f"submitted resume of {args.study} as job {job_id}")
        return EXIT_OK
    target = experiment_target(args.study, args.storage)
    ray_environment(args.address)
    from study.execution import runner
    from study.storage import experiment

    spec = experiment.read_spec(target)  # refuses a directory that holds no study
    print(f"resuming {target}", flush=True)
    summary = runner.resume(target, address=args.address)
    return _then_confirm(runner, spec, summary, args.address)


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


def _summarise(s: object, spec: object) -> int:
    """Print how the search ended and its best trial; exit 1 if no trial finished."""
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
