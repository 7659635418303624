"""The study lock: one driver per study, with real processes, locally and on S3 (moto)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from study.execution.lock import LOCK_DIR, StudyLock, StudyLockedError
from study.storage.locations import join_location

HOLD = """
import sys
from study.execution.lock import StudyLock, StudyLockedError
print("READY", flush=True)
sys.stdin.readline()  # GO: every contender tries at once
try:
    lock = StudyLock(sys.argv[1])
    lock.acquire()
except StudyLockedError:
    print("LOST", flush=True)
    sys.exit(0)
print("WON", flush=True)
sys.stdin.read()  # held until the test closes our stdin (or kills us)
lock.release()
"""

ROOT = Path(__file__).resolve().parents[3]


def contenders(directory: str, n: int = 1) -> list[subprocess.Popen]:
    """``n`` processes that say READY, try to take the lock when a line comes on their
    stdin (sent here, to all at once), say WON or LOST, and hold a won lock until their
    stdin is closed."""
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, directory], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
             for _ in range(n)]
    for p in procs:  # however slowly they start
        assert p.stdout.readline().strip() == "READY", p.communicate(timeout=300)[1][-2000:]
    for p in procs:
        p.stdin.write("GO\n")
        p.stdin.flush()
    return procs


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exactly_one_of_racing_drivers_wins(where: str, tmp_path: Path, request) -> None:
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_root")
    directory = join_location(base, f"race-{where}")
    procs = contenders(directory, 4)  # all four try at the same moment
    said = sorted(p.stdout.readline().strip() for p in procs)  # the winner holds meanwhile
    errs = [p.communicate(timeout=300)[1] for p in procs]  # closes stdin: the winner lets go
    assert said == ["LOST", "LOST", "LOST", "WON"], [err[-2000:] for err in errs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for err in errs]


def test_refusal_names_holder_and_dead_driver_is_taken_over(tmp_path: Path) -> None:
    directory = str(tmp_path / "study")
    (holder,) = contenders(directory)
    try:
        assert holder.stdout.readline().strip() == "WON"
        with pytest.raises(StudyLockedError) as refused:
            StudyLock(directory).acquire()
        text = str(refused.value)
        assert f"pid {holder.pid}" in text and f"host {socket.gethostname()}" in text
        assert "since 20" in text and "'study'" in text
        os.kill(holder.pid, signal.SIGKILL)  # a killed driver leaves its lock file behind
        holder.wait(timeout=300)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert len(list((tmp_path / "study" / LOCK_DIR).glob("*.lock"))) == 1
    with StudyLock(directory) as lock:  # same host, pid gone: taken over at once
        assert [h.pid for h in lock.holders()] == [os.getpid()]
    assert list((tmp_path / "study" / LOCK_DIR).glob("*.lock")) == []


def _foreign_lock(directory: Path, heartbeat_age_s: float) -> None:
    (directory / LOCK_DIR).mkdir(parents=True)
    now = time.time()
    (directory / LOCK_DIR / "00000000000000000001-abc.lock").write_text(json.dumps({
        "host": "another-host", "pid": 1, "since": now - 3600,
        "heartbeat": now - heartbeat_age_s, "state": "held"}))


def test_other_host_lock_is_honoured_until_its_lease_expires(tmp_path: Path) -> None:
    _foreign_lock(tmp_path / "live", heartbeat_age_s=5)
    with pytest.raises(StudyLockedError, match="host another-host, pid 1"):
        StudyLock(str(tmp_path / "live"), lease_s=60).acquire()
    _foreign_lock(tmp_path / "dead", heartbeat_age_s=120)
    with StudyLock(str(tmp_path / "dead"), lease_s=60) as lock:
        assert [h.host for h in lock.holders()] == [socket.gethostname()]


def test_heartbeat_keeps_a_long_run_alive_and_release_is_clean(tmp_path: Path) -> None:
    # a lease of 20 heartbeats: a heartbeat thread 5x slower on a loaded machine still
    # keeps it
    lock = StudyLock(str(tmp_path / "s"), heartbeat_s=0.1, lease_s=2.0)
    lock.acquire()
    first = lock.holders()[0].heartbeat
    time.sleep(2.5)  # longer than the lease: only the heartbeat keeps it (the thing tested)
    assert lock.holders()[0].heartbeat > first
    with pytest.raises(StudyLockedError):
        StudyLock(str(tmp_path / "s"), lease_s=2.0).acquire()
    lock.release()
    StudyLock(str(tmp_path / "s")).acquire()


def test_s3_lock_refuses_then_frees(s3_root: str) -> None:
    directory = join_location(s3_root, "study")
    with StudyLock(directory):
        with pytest.raises(StudyLockedError, match=f"pid {os.getpid()}"):
            StudyLock(directory).acquire()
    with StudyLock(directory) as again:
        assert len(again.holders()) == 1
