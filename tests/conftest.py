"""Test-wide settings: Ray stays on loopback and quiet; no GPU is assumed. The embedded Ray
that in-process studies start (``tests/inprocess.py``) is shared by every test and shut
down once, at the end of the session."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

# Read by Ray at import time: bind the embedded Ray to 127.0.0.1, keep output short.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# A Ray worker (a trial's process) that has not registered within 60 s (Ray's default) is
# given up; on a loaded 2-core machine starting one (Python, torch) can take longer. Read by
# every Ray the tests start, in this process or in a driver they start.
os.environ.setdefault("RAY_worker_register_timeout_seconds", "600")


@pytest.fixture(scope="session", autouse=True)
def shared_ray() -> Iterator[None]:
    """Shut down, at the end, the embedded Ray the tests attached to (one per session:
    starting Ray costs seconds; a test that needs its own cluster shuts it down itself)."""
    yield
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


_STATE = ("import sys; from study.execution.jobs import client; "
          "print(client(sys.argv[1]).get_job_status(sys.argv[2]).value)")


@pytest.fixture()
def job_state() -> Callable[[str, str], str]:
    """A submitted job's state, asked from a fresh process as the CLI would (Ray caches
    its authentication state per process, and tests start Ray in-process too)."""

    def state(address: str, job_id: str) -> str:
        out = subprocess.run([sys.executable, "-c", _STATE, address, job_id],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "RAY_AUTH_MODE": "token"})
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1]

    return state
