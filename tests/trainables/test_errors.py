"""One error root: every user-facing error type names its exit code, and the CLI maps by
type (not by the class's name)."""

from __future__ import annotations

import importlib

import pytest

from trainables.errors import EXIT_FAILED, EXIT_USAGE, DpstudyError

USER_ERRORS = {  # module, class, exit code, the standard base it keeps
    ("study.cli.targets", "UsageError", EXIT_USAGE, Exception),
    ("study.execution.lock", "StudyLockedError", EXIT_USAGE, RuntimeError),
    ("study.storage.locations", "LocationError", EXIT_USAGE, ValueError),
    ("study.privacy.release", "ReleaseError", EXIT_USAGE, ValueError),
    ("study.execution.jobs", "ClusterError", EXIT_FAILED, RuntimeError),
    ("study.execution.runner", "StudyExistsError", EXIT_USAGE, RuntimeError),
    ("study.execution.tune_state", "DamagedStateError", EXIT_FAILED, RuntimeError),
    ("study.spec.model", "SpecError", EXIT_USAGE, ValueError),
    ("trainables.accounting", "BudgetError", EXIT_USAGE, ValueError),
    ("trainables.config", "ConfigError", EXIT_USAGE, ValueError),
    ("trainables.errors", "DataUnavailableError", EXIT_USAGE, FileNotFoundError),
    ("trainables.checkpoint", "CheckpointError", EXIT_USAGE, ValueError),
    ("trainables.audit", "AuditUnavailableError", EXIT_FAILED, ImportError),
}


@pytest.mark.parametrize(("module", "name", "code", "base"), sorted(USER_ERRORS, key=str))
def test_every_user_error_derives_from_the_root(module: str, name: str, code: int,
                                                base: type) -> None:
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, DpstudyError) and issubclass(cls, base)
    assert cls.exit_code == code


def test_the_cli_maps_by_type_and_prints_one_line(capsys: pytest.CaptureFixture) -> None:
    from study.cli import report_error
    from study.execution.lock import StudyLockedError
    from trainables.errors import FailureError

    class Renamed(StudyLockedError):  # a name the CLI never heard of
        pass

    assert report_error(Renamed("held by host:1")) == EXIT_USAGE
    assert capsys.readouterr().err == "error: held by host:1\n"

    class Broken(FailureError):
        pass

    assert report_error(Broken("cluster gone")) == EXIT_FAILED
    with pytest.raises(KeyError):
        report_error(KeyError("a bug keeps its traceback"))


def test_a_spec_error_prints_its_own_header(capsys: pytest.CaptureFixture) -> None:
    from study.cli import report_error
    from study.spec.model import SpecError

    assert report_error(SpecError(["trials: must be >= 1 (got 0)"])) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("invalid study spec (1 problem):\n  - trials")
