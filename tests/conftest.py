"""Test-wide settings: Ray stays on loopback and quiet; no GPU is assumed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest

# Read by Ray at import time: bind the embedded Ray to 127.0.0.1, keep output short.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


_STATE = "import sys; from study.execution.jobs import job_status; print(job_status(*sys.argv[1:]))"


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
