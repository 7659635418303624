"""The root of every error dpstudy shows a user, and the exit code each kind maps to.

Every user-facing error of ``trainables`` and ``study`` derives from :class:`DpstudyError`
and names its exit code, so the CLI maps an error by its *type*: ``2`` for bad input (a
spec, a path, a filter, a study that cannot be released), ``1`` for a runtime failure (a
cluster that cannot be reached, damaged state, a missing optional extra). The error keeps
the standard base it had (``ValueError``, ``RuntimeError``, ...), so code that catches
those still works.

``KeyboardInterrupt`` (``study.execution``'s interrupted study, exit 130) is not an
``Exception`` and stays outside this tree.
"""

from __future__ import annotations

#: Exit codes of the ``dpstudy`` and ``python -m trainables`` commands.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class DpstudyError(Exception):
    """An error shown to the user as one message, without a traceback.

    ``exit_code`` is the command's exit status; ``prefix`` is printed before the message
    (errors that list several problems print their own header instead)."""

    exit_code: int = EXIT_FAILED
    prefix: str = "error: "

    def user_message(self) -> str:
        """The text the CLI prints on standard error."""
        return f"{self.prefix}{self}"


class InputError(DpstudyError):
    """Bad input from the user (a value, a file, a path, a request): exit code 2."""

    exit_code = EXIT_USAGE


class FailureError(DpstudyError):
    """The input was fine but the work could not be done: exit code 1."""

    exit_code = EXIT_FAILED


class DataUnavailableError(InputError, FileNotFoundError):
    """The dataset's files are not on this machine and could not be obtained."""
