"""The privacy commands: ``release`` (what a private-selection study's guarantee covers)
and ``audit`` (an empirical lower bound on a trial's epsilon)."""

from __future__ import annotations

import argparse
import os

from study.cli.running import ray_environment
from study.cli.targets import UsageError, results_uri
from trainables.errors import EXIT_FAILED, EXIT_OK


def cmd_release(args: argparse.Namespace) -> int:
    """Write only what a private-selection study's guarantee covers."""
    from study.privacy.release import release
    from study.storage import experiment
    from study.storage.read import read_trials

    results = results_uri(args.results)
    spec = experiment.find_spec(results, args.study)
    rows = [r for r in read_trials(results).to_pylist() if r.get("study") == spec.name]
    experiment = os.path.expanduser(args.experiment or experiment.experiment_dir(spec))
    done = release(spec, rows, results, args.out, experiment=experiment)
    print(f"[{spec.name}] released trial {done.trial_id} (DP score {done.score:.4f}) at "
          f"study epsilon {done.epsilon:.3f}, delta {done.delta:g} into {done.directory}; "
          f"see PRIVATE.txt for what must stay private")
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
        where = results_uri(where)  # a results directory, URI or study name
    target = audit.resolve(where, trial=args.trial, best=args.best, study=args.study)
    audit.prepare(target)
    ray_environment(args.address)
    row = audit.record(target, settings, audit.run_remote(target, settings,
                                                          address=args.address))
    print(audit.format_row(row))
    return EXIT_FAILED if row["violation"] else EXIT_OK  # a broken mechanism fails a CI job
