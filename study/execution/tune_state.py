"""Tune's experiment state: check it before a resume, and repair it from the driver's copy.

Ray Tune (2.60) writes ``experiment_state-<session>.json``, ``searcher-state-<session>.pkl``
and ``search_gen_state-<session>.json`` into a staging folder on the driver
(``<ray temp>/session_*/artifacts/<run>/<study>/driver_artifacts``), then copies them over
the previous ones in the experiment directory; neither write is atomic. A driver killed
during the copy leaves a truncated file, and ``Tuner.restore`` then logs "Failed to
restore the run state" and *starts the study over*: finished trials not yet in Parquet are
lost and ``resume`` exits 0 with fewer rows than trials (seen with ``kill -9``). Hence
:func:`repair`, run before every restore.

The staged copy may be cut short too (Tune rewrites it at every snapshot while a background
thread may still be copying the previous one). Hence :class:`StateBackup`: called from the
study's callback right after Tune wrote the staged files (``Callback.get_state`` runs at the
end of ``TuneController.save_to_dir``), it copies the three files, whole and together, into
``<experiment>/.dpstudy-state/``. A driver killed after a snapshot but before the background
copy carried it leaves an intact but older state (a trial finished in Parquet still running
for Tune): :func:`repair` puts the backup back when it is from a later controller step.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import os
import pickle
import posixpath
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from trainables.compat import experiment_state_step, ray_session_temp_dir
from trainables.errors import FailureError

EXPERIMENT_STATE = "experiment_state-*.json"
BACKUP_DIR = ".dpstudy-state"


class DamagedStateError(FailureError, RuntimeError):
    """A state file of the study is truncated and no intact copy was found."""


def loads(data: bytes) -> bool:
    """Whether ``data`` is a complete state file: JSON, or a pickle (Tune pickles
    ``search_gen_state-*.json``)."""
    for parse in (json.loads, pickle.loads):  # both refuse empty data
        with contextlib.suppress(Exception):  # any failure to load: "not this format"
            parse(data)  # the study's own file, written by its own driver
            return True
    return False


def newest_session_files(names: list[str]) -> list[str]:
    """The state files of the newest session (the one Tune restores), by file name."""
    states = sorted(fnmatch.filter(names, EXPERIMENT_STATE))
    if not states:
        return []
    session = states[-1][len("experiment_state-"):-len(".json")]
    wanted = {f"experiment_state-{session}.json", f"searcher-state-{session}.pkl",
              f"search_gen_state-{session}.json"}
    return sorted(n for n in names if n in wanted)


def repair(fs: pafs.FileSystem, directory: str, *, temp_root: str | None = None) -> list[str]:
    """Check the newest session's state files in ``directory`` (on ``fs``); if any is
    damaged, or the :class:`StateBackup` is intact and newer (a later controller step: the
    driver was killed before Tune's background copy carried its last snapshot), put back
    the whole set from the backup, or else each damaged file from the newest intact staged
    copy under ``temp_root`` (the Ray temp folder; the staged write ends before the copy
    starts). Returns the names repaired.

    Raises :class:`DamagedStateError` for a damaged file with no intact copy: refusing is
    better than a silent restart."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(directory))
    except OSError:  # not found included
        return []
    current = newest_session_files([posixpath.basename(i.path) for i in infos
                                    if i.type == pafs.FileType.File])
    found = {n: read(fs, posixpath.join(directory, n)) for n in current}
    damaged = [n for n, data in found.items() if not loads(data)]
    backup = posixpath.join(directory, BACKUP_DIR)
    saved = {n: read(fs, posixpath.join(backup, n)) for n in current}  # b"" when missing
    intact = bool(saved) and all(loads(data) for data in saved.values())
    if not damaged and not (intact and step(saved) > step(found)):
        return []
    if intact:
        for name, data in saved.items():
            replace(fs, posixpath.join(directory, name), data)
        return current
    temp_root = temp_root or ray_session_temp_dir() or os.path.join(
        os.environ.get("RAY_TMPDIR", "/tmp"), "ray")
    for name in damaged:
        copy = intact_copy(temp_root, posixpath.basename(directory), name)
        if copy is None:
            raise DamagedStateError(
                f"resume: {posixpath.join(directory, name)} is damaged (the driver was "
                f"stopped while Tune was writing it) and no intact copy was found; resuming "
                f"would restart the study and lose finished trials. Resume on the machine "
                f"that ran the driver, or start the study again under another name")
        replace(fs, posixpath.join(directory, name), copy)
    return damaged


def step(files: dict[str, bytes]) -> int:
    """The controller step at which Tune wrote the experiment state among ``files`` (-1 if
    none can be read)."""
    states = [d for n, d in files.items() if n.startswith("experiment_state-")]
    return experiment_state_step(states[0]) if states else -1


def read(fs: pafs.FileSystem, path: str) -> bytes:
    """The bytes of ``path`` (empty if it cannot be read)."""
    try:
        with fs.open_input_stream(path) as f:
            return f.readall()
    except OSError:
        return b""


class StateBackup:
    """Copies Tune's freshly staged state files beside the study (see the module doc);
    :meth:`save` writes only when the experiment state changed."""

    def __init__(self, staging: str, fs: pafs.FileSystem, experiment: str) -> None:
        self.staging, self.fs, self.experiment = staging, fs, experiment
        self.last: bytes | None = None

    def save(self) -> bool:
        """Back up the newest staged session; returns whether anything was written."""
        try:
            names = newest_session_files(os.listdir(self.staging))
        except OSError:
            return False
        files = {n: Path(self.staging, n).read_bytes() for n in names}
        state = next((d for n, d in files.items() if n.startswith("experiment_state-")), None)
        if not state or state == self.last:
            return False
        backup = posixpath.join(self.experiment, BACKUP_DIR)
        self.fs.create_dir(backup, recursive=True)
        for name in sorted(files, key=lambda n: n.startswith("experiment_state-")):
            replace(self.fs, posixpath.join(backup, name), files[name])  # state file last
        self.last = state
        return True


def intact_copy(temp_root: str, study_dir_name: str, name: str) -> bytes | None:
    """The newest staged copy of ``name`` for the study called ``study_dir_name`` under the
    Ray temp folder ``temp_root`` that loads, or None."""
    pattern = os.path.join(glob.escape(temp_root), "session_*", "artifacts", "*",
                           glob.escape(study_dir_name), "driver_artifacts", glob.escape(name))
    for candidate in sorted(glob.glob(pattern), key=os.path.getmtime, reverse=True):
        data = Path(candidate).read_bytes()
        if loads(data):
            return data
    return None


def replace(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` whole: beside it first, then renamed over it."""
    temporary = f"{path}.dpstudy-{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(temporary) as out:
        out.write(data)
    fs.move(temporary, path)
