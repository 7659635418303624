"""Submitting studies to a running Ray cluster through the Jobs API (token auth on)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow

HEAD = """
import os, sys, time
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
from ray._private import parameter

# The dashboard agent (it runs the jobs) listens on a fixed port, 52365, unless told
# otherwise, and ray.init cannot tell it: a second Ray with a dashboard on this machine
# (another test run side by side) left this one without a Jobs API. A free port instead.
_params = parameter.RayParams.__init__
def _free_agent_port(self, *args, **kwargs):
    kwargs.setdefault("dashboard_agent_listen_port", int(sys.argv[2]))
    _params(self, *args, **kwargs)
parameter.RayParams.__init__ = _free_agent_port
# Its own temp dir, with its address recorded there: the job supervisor resolves the
# driver's RAY_ADDRESS ("auto") from the head's temp dir, and in the shared /tmp/ray it found
# whichever Ray another test started last (a `ray.cluster_utils.Cluster`, an embedded Ray):
# the study then ran its trials on that cluster, which has no copy of the job's working dir.
ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
         dashboard_port=int(sys.argv[1]), _temp_dir=sys.argv[3])
ray._private.utils.write_ray_address(ray.get_runtime_context().gcs_address, sys.argv[3])
print("READY", flush=True)
while True:
    time.sleep(60)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray head with the dashboard (Jobs API) on loopback, in its own process group."""
    port = free_port()
    log = tmp_path_factory.mktemp("head") / "head.log"
    with open(log, "w") as out:
        temp_dir = tempfile.mkdtemp(prefix="rayjobs-", dir="/tmp")  # short: socket paths
        head = subprocess.Popen([sys.executable, "-c", HEAD, str(port), str(free_port()),
                                 temp_dir],
                                stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # minutes: a loaded machine starts Ray slowly
        while "READY" not in log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # only this head's processes, never `ray stop`
        shutil.rmtree(temp_dir, ignore_errors=True)


def dpstudy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study.cli", *args], capture_output=True,
                          text=True, timeout=900, env={**os.environ, **(env or {})})


def small_spec(tmp_path: Path, name: str, trials: int = 2) -> Path:
    """The quickstart, shrunk. Jobs run ``--python sys.executable``: the cluster's
    interpreter with dpstudy's dependencies (a bare ``python`` may be another one here)."""
    spec = yaml.safe_load(Path("examples/quickstart.yaml").read_text())
    spec.update(name=name, trials=trials, scheduler="none", storage=str(tmp_path / "runs"),
                results=str(tmp_path / "results" / name))
    spec["search"].update(max_epochs=1, batch_size=500)
    spec.pop("confirm", None)  # the search only: one row per trial
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def wait_for(job_state, address: str, job_id: str, states: set[str],
             timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while (status := job_state(address, job_id)) not in states:
        assert time.monotonic() < deadline, f"{job_id} still {status}"
        time.sleep(1)
    return status


def test_submit_returns_at_once_and_the_study_completes(cluster: str, tmp_path: Path,
                                                       job_state) -> None:
    started = time.monotonic()
    done = dpstudy("submit", str(small_spec(tmp_path, "remote")), "--address", cluster,
                   "--python", sys.executable)
    assert done.returncode == 0, done.stderr
    results = tmp_path / "results" / "remote"
    # it returned at once: before the study could train its trials (minutes), and quickly
    # even on a loaded machine
    assert not (results / "trials.parquet").exists() or len(
        pq.read_table(results / "trials.parquet")) < 2
    assert time.monotonic() - started < 180
    job_id = done.stdout.strip().splitlines()[-1]
    assert job_id.startswith("dpstudy-remote-")

    status = wait_for(job_state, cluster, job_id, {"SUCCEEDED", "FAILED", "STOPPED"})
    assert status == "SUCCEEDED", dpstudy("logs", job_id, "--address", cluster).stdout[-3000:]
    rows = pq.read_table(results / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    assert all(r["epsilon_spent"] <= 3.0 for r in rows)

    status = dpstudy("status", "--address", cluster)
    assert job_id in status.stdout and "SUCCEEDED" in status.stdout
    assert "2 completed" in status.stdout
    logs = dpstudy("logs", job_id, "--address", cluster)
    assert "[remote] finished: 2 completed" in logs.stdout


def test_stop_a_running_study(cluster: str, tmp_path: Path, job_state) -> None:
    done = dpstudy("submit", str(small_spec(tmp_path, "stopme", trials=20)), "--address",
                   cluster, "--python", sys.executable)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().splitlines()[-1]
    terminal = {"STOPPED", "FAILED", "SUCCEEDED"}
    assert wait_for(job_state, cluster, job_id, {"RUNNING"} | terminal) == "RUNNING"
    stopped = dpstudy("stop", job_id, "--address", cluster)
    assert stopped.returncode == 0 and "stopping" in stopped.stdout
    assert wait_for(job_state, cluster, job_id, terminal) == "STOPPED"


def test_wrong_token_and_unreachable_address_are_clear_errors(cluster: str) -> None:
    bad = dpstudy("status", "--address", cluster, env={"RAY_AUTH_TOKEN": "0" * 32})
    assert bad.returncode == 1
    assert "rejected our authentication token" in bad.stderr
    assert "~/.ray/auth_token" in bad.stderr
    gone = dpstudy("status", "--address", f"http://127.0.0.1:{free_port()}")
    assert gone.returncode == 1
    assert "cannot reach the Ray Jobs API" in gone.stderr
