"""The ``dpstudy`` CLI and the benchmark scripts run inside the test process, on the one
embedded Ray the tests share (``tests/conftest.py`` shuts it down at the end).

A subprocess costs an interpreter, the torch and Ray imports and, for a study, a Ray of its
own: tens of seconds on a loaded 2-core machine. Tests whose point is a real process (kill
-9, Ctrl-C, racing drivers, ``python benchmarks/x.py`` as such) keep their subprocess; the
others call :func:`dpstudy` and get the same exit code, stdout and stderr.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Done:
    """What a command left behind, like ``subprocess.CompletedProcess``."""

    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _environment(cwd: str | os.PathLike | None, env: dict[str, str] | None) -> Iterator[None]:
    """``cwd`` and extra environment variables for the duration of one command."""
    saved_cwd = os.getcwd()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def dpstudy(*args: str, cwd: str | os.PathLike | None = None,
            env: dict[str, str] | None = None) -> Done:
    """``dpstudy ARGS`` in this process (from ``cwd``, with ``env`` added); a study runs on
    the Ray this process is attached to, started on first use and then shared."""
    from study.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _environment(cwd, env), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse: usage errors
            code = exit_.code if isinstance(exit_.code, int) else 1
    return Done(code, out.getvalue(), err.getvalue())


def benchmark(script: str, *args: str) -> Done:
    """``python benchmarks/SCRIPT ARGS`` from the repository root, run as ``__main__`` in
    this process (its directory first on ``sys.path``, as Python puts it); the warning
    filters and ``sys.path`` it changes are put back."""
    path = ROOT / "benchmarks" / script
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.parent))
    code = 0
    try:
        with _environment(ROOT, None), warnings.catch_warnings(), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(path), run_name="__main__")
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (
                    0 if exit_.code is None else 1)
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
    return Done(code, out.getvalue(), err.getvalue())
