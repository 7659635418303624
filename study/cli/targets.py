"""What a ``dpstudy`` command is pointed at: results directories, experiment directories and
storage roots, resolved (or refused with a :class:`UsageError`) before Ray is imported."""

from __future__ import annotations

import os

from trainables.errors import InputError

DEFAULT_STORAGE = "~/dpstudy-runs"


class UsageError(InputError):
    """Bad input from the user: printed without a traceback, exit code 2."""


def results_uri(results: str) -> str:
    """A results directory/URI as given, or ``results/NAME`` for a bare study name."""
    if "://" in results or os.path.exists(os.path.expanduser(results)):
        return os.path.expanduser(results)
    named = os.path.join("results", results)
    if os.path.isdir(named):
        return named
    raise UsageError(f"results: no results directory {results!r} (nor {named!r})")


def experiment_target(study: str, storage: str) -> str:
    """The experiment directory ``study`` (a path, relative ones made absolute: Tune takes
    only absolute paths and URIs) or ``storage/study``, preferring one with a saved spec;
    a :class:`UsageError` if neither is a directory, before Ray starts."""
    from study.storage.experiment import SPEC_FILE
    from study.storage.locations import resolve_location

    if "://" in study:
        return study
    candidates = list(dict.fromkeys(resolve_location(path) for path in (
        study, os.path.join(os.path.expanduser(storage), study))))
    # one with a saved spec first; else a folder (resume says it is no experiment directory)
    for target in sorted(candidates, key=lambda c: not os.path.isfile(os.path.join(c, SPEC_FILE))):
        if os.path.isdir(target):
            return target
    tried = " nor ".join(repr(c) for c in candidates)
    raise UsageError(f"study: no experiment directory {tried} (give DIR/NAME or NAME "
                     f"--storage DIR) (got {study!r})")


def storage_problem(storage: str, *, given: bool) -> str | None:
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
