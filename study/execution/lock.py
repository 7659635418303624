"""One driver per study: a lock beside Tune's experiment state, on any pyarrow filesystem.

The lock is a directory ``STORAGE/NAME/.dpstudy-lock/`` of small JSON files, one per
driver that wants the study (``<token>.lock``: host, pid, since, heartbeat, state). It
needs no atomic rename or create-if-absent, so it works the same on a local disk and on an
object store with read-after-write consistent listings (S3, GCS):

1. delete the files of stale holders (see below);
2. write our own file (``state: contending``);
3. list the directory. If any other live file is there we did not win: delete ours and
   refuse (a ``held`` file) or back off and retry (only ``contending`` ones).

Two drivers cannot both win: whichever listed second sees the other's file, which stays
until its owner has either lost or released. The holder rewrites its file every
``heartbeat_s`` seconds. A lock is stale when its driver ran on this host and its pid is
gone (a killed driver), or when its heartbeat is older than ``lease_s`` (any host; clocks
are assumed to agree to within a small fraction of the lease).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from study.storage.locations import filesystem, join_location
from trainables.errors import InputError

LOCK_DIR = ".dpstudy-lock"
LEASE_S = 60.0
HEARTBEAT_S = 10.0


class StudyLockedError(InputError, RuntimeError):
    """Another driver holds the study; the message names it (host, pid, since when)."""


@dataclass(frozen=True)
class Holder:
    """What a lock file says about the driver that wrote it."""

    token: str
    host: str
    pid: int
    since: float
    heartbeat: float
    state: str

    def describe(self) -> str:
        """``host H, pid P, since 2026-01-01 12:00:00 UTC (heartbeat 3 s ago)``."""
        since = dt.datetime.fromtimestamp(self.since, dt.timezone.utc)
        age = max(0.0, time.time() - self.heartbeat)
        return (f"host {self.host}, pid {self.pid}, since {since:%Y-%m-%d %H:%M:%S} UTC "
                f"(last heartbeat {age:.0f} s ago)")

    def stale(self, lease_s: float) -> bool:
        """Its driver is gone: a dead pid on this host, or no heartbeat for ``lease_s``."""
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass  # alive, run by another user
        return time.time() - self.heartbeat > lease_s


class StudyLock:
    """The lock of the study whose experiment directory is ``directory``.

    Use as a context manager (or :meth:`acquire` / :meth:`release`). ``lost`` becomes
    True if another driver took the lock over (our heartbeat had stopped for a lease)."""

    def __init__(self, directory: str, *, lease_s: float = LEASE_S,
                 heartbeat_s: float = HEARTBEAT_S, retries: int = 5) -> None:
        self.directory = directory
        self.lease_s, self.heartbeat_s, self.retries = lease_s, heartbeat_s, retries
        self._fs, root = filesystem(join_location(directory, LOCK_DIR), "storage")
        self._root = root.rstrip("/")
        self.token = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        self._path = f"{self._root}/{self.token}.lock"
        self._since = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise :class:`StudyLockedError` naming the holder."""
        self._fs.create_dir(self._root, recursive=True)
        for attempt in range(self.retries + 1):
            for holder in self.holders():
                if holder.token != self.token and holder.stale(self.lease_s):
                    self._delete(f"{self._root}/{holder.token}.lock")
            self._write("contending")
            others = [h for h in self.holders() if h.token != self.token]
            if not others:
                self._write("held")
                self._thread = threading.Thread(target=self._beat, daemon=True,
                                                name="dpstudy-lock-heartbeat")
                self._thread.start()
                return
            self._delete(self._path)
            held = [h for h in others if h.state == "held"]
            if held or attempt == self.retries:
                holder = min(held or others, key=lambda h: h.since)
                raise StudyLockedError(
                    f"study {os.path.basename(self.directory.split('?')[0].rstrip('/'))!r} "
                    f"is already being run by another driver ({holder.describe()}); lock "
                    f"{join_location(self.directory, LOCK_DIR)}. Wait for it to finish or "
                    f"stop it; a lock whose driver died is taken over automatically (at once "
                    f"on the same host, after {self.lease_s:g} s without heartbeat elsewhere)")
            time.sleep(random.uniform(0.05, 0.5))

    def release(self) -> None:
        """Stop the heartbeat and delete our lock file (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if not self.lost:
            self._delete(self._path)

    def holders(self) -> list[Holder]:
        """Every lock file now present and readable (stale or not)."""
        infos = self._fs.get_file_info(pafs.FileSelector(self._root, allow_not_found=True))
        found = (self._read(i) for i in infos
                 if i.type == pafs.FileType.File and i.base_name.endswith(".lock"))
        return [h for h in found if h is not None]

    def _read(self, info: pafs.FileInfo) -> Holder | None:
        token = info.base_name[:-len(".lock")]
        try:
            with self._fs.open_input_stream(info.path) as f:
                data = json.loads(f.read())
            return Holder(token, str(data["host"]), int(data["pid"]), float(data["since"]),
                          float(data["heartbeat"]), str(data["state"]))
        except FileNotFoundError:
            return None  # released while we listed
        except (OSError, ValueError, KeyError, TypeError):
            # unreadable: treat as a holder whose heartbeat is the file's mtime
            mtime = info.mtime.timestamp() if info.mtime else time.time()
            return Holder(token, host="?", pid=-1, since=mtime, heartbeat=mtime, state="held")

    def _write(self, state: str) -> None:
        data = {"host": socket.gethostname(), "pid": os.getpid(), "since": self._since,
                "heartbeat": time.time(), "state": state}
        # readers never see half a file: on a local disk it is written beside, then renamed;
        # an object store publishes an upload whole
        local = isinstance(self._fs, pafs.LocalFileSystem)
        path = f"{self._root}/.{self.token}.tmp" if local else self._path
        with self._fs.open_output_stream(path) as out:
            out.write(json.dumps(data).encode())
        if local:
            self._fs.move(path, self._path)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self._fs.get_file_info(self._path).type != pafs.FileType.File:
                    self.lost = True
                    print(f"warning: the lock of {self.directory} was taken over by another "
                          f"driver (no heartbeat for {self.lease_s:g} s)", flush=True)
                    return
                self._write("held")
            except OSError:
                pass  # a missed heartbeat; the lease allows several

    def _delete(self, path: str) -> None:
        with contextlib.suppress(OSError):  # already gone, or removed as stale by another
            self._fs.delete_file(path)
