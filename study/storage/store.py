"""The results store: one study's trials and epochs, written as immutable part files::

    RESULTS/trials.parquet/part-<UTC stamp>-<uuid>.parquet   one row: one trial
    RESULTS/epochs.parquet/part-<same name>.parquet          that trial's epoch rows

A trial recorded again (retried, resumed) gets a new part with a later name, and its older
parts are deleted after the new one is published; readers keep the newest part per
``(study, trial_id)``, so a reader between the two steps still sees each trial once. Nothing
is rewritten in place, so any number of studies can share one results directory, on a local
disk or on an object store without atomic rename.
"""

from __future__ import annotations

import datetime as dt
import itertools
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from study.storage.locations import filesystem
from study.storage.read import read_newest, trial_parts
from study.storage.schema import (
    EPOCHS_FILE,
    EPOCHS_SCHEMA,
    PART_PREFIX,
    STUDY_METADATA_KEY,
    TRIALS_FILE,
    TRIALS_SCHEMA,
    coerce_row,
    package_version,
)


class ResultsStore:
    """One study's trials and epochs in the results directory ``uri`` (a local path or a
    pyarrow.fs URI). Its existing parts are loaded on construction, so a resumed study merges
    with them; other studies' parts are never read, rewritten or deleted. At most one writer
    per study (the study lock, :mod:`study.execution.lock`, ensures it)."""

    def __init__(self, uri: str, study: str) -> None:
        self.study = study
        fs, path = filesystem(uri, "results")
        self._fs, self._dir = fs, path.rstrip("/")
        self._local = isinstance(fs, pafs.LocalFileSystem)
        self._trials: dict[tuple[str, str], dict[str, Any]] = {}
        self._epochs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._files: dict[tuple[str, str], list[str]] = {}  # written parts, per trial
        self._pending: dict[tuple[str, str], None] = {}  # an ordered set
        self.metadata: dict[str, str] = {}  # extra file metadata of trials.parquet
        self._load()

    def _path(self, name: str) -> str:
        return f"{self._dir}/{name}"

    def _staging(self, table: str) -> str:
        return self._path(f"{table}/.staging-{self.study}")

    def _load(self) -> None:
        """Remove this study's files staged by a killed writer (never another study's), then
        read its newest parts."""
        for table in (TRIALS_FILE, EPOCHS_FILE):
            kind = self._fs.get_file_info(self._path(table)).type
            if self._local and kind == pafs.FileType.Directory:
                self._fs.delete_dir_contents(self._staging(table), missing_dir_ok=True)
            if kind == pafs.FileType.File:
                raise ValueError(f"{self._path(table)}: a single-file results table (written by "
                                 f"dpstudy < 0.2); dpstudy now writes a directory of part files "
                                 f"there: move the file away or choose another results "
                                 f"directory")
        self._files = trial_parts(self._fs, self._dir, self.study)
        for row in read_newest(self._fs, self._dir, TRIALS_FILE, self._files).to_pylist():
            key = (row["study"], row["trial_id"])
            self._trials[key], self._epochs[key] = row, []
        for row in read_newest(self._fs, self._dir, EPOCHS_FILE, self._files).to_pylist():
            self._epochs[(row["study"], row["trial_id"])].append(row)

    def add_trial(self, row: dict, epochs: list[dict]) -> None:
        """Insert or replace (by ``trial_id``) one trial's row and all its epoch rows; written
        by the next :meth:`flush`.

        ``study`` defaults to the store's study and ``version`` to the package version;
        other missing columns become null. Unknown keys raise ``ValueError``.
        """
        row = {"study": self.study, "version": package_version(), **row}
        if row["study"] != self.study:
            raise ValueError(f"trial row is for study {row['study']!r}, store is {self.study!r}")
        trial = coerce_row(TRIALS_SCHEMA, row, "trial row")
        rows = [self._epoch_row(trial["trial_id"], e) for e in epochs]
        numbers = [r["epoch"] for r in rows]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"trial {trial['trial_id']!r}: duplicate epoch numbers {numbers}")
        key = (self.study, trial["trial_id"])
        self._trials[key], self._epochs[key] = trial, sorted(rows, key=lambda r: r["epoch"])
        self._pending[key] = None

    def _epoch_row(self, trial_id: str, epoch: dict) -> dict[str, Any]:
        what = f"epoch row of trial {trial_id!r}"
        full = {"study": self.study, "trial_id": trial_id, **epoch}
        if str(full["trial_id"]) != trial_id or full["study"] != self.study:
            raise ValueError(f"{what}: study/trial_id do not match the trial row")
        return coerce_row(EPOCHS_SCHEMA, full, what)

    def flush(self) -> None:
        """Write each trial added since the last flush as a new part (its epochs part first,
        then its trial part, each published whole by :func:`publish`, staged locally in this
        study's staging folder), then delete its superseded parts."""
        for table in (TRIALS_FILE, EPOCHS_FILE):  # a local staging folder is inside the table
            self._fs.create_dir(self._staging(table) if self._local else self._path(table),
                                recursive=True)
        part_schema = TRIALS_SCHEMA.with_metadata({  # with this study's name and ``metadata``
            **TRIALS_SCHEMA.metadata, STUDY_METADATA_KEY: self.study, **self.metadata})
        while self._pending:
            key = next(iter(self._pending))
            name = new_part_name()
            epochs = pa.Table.from_pylist(self._epochs[key], schema=EPOCHS_SCHEMA)
            trial = pa.Table.from_pylist([self._trials[key]], schema=part_schema)
            for table, data in ((EPOCHS_FILE, epochs), (TRIALS_FILE, trial)):
                publish(self._fs, self._path(f"{table}/{name}"), f"{self._staging(table)}/{name}",
                        data)
            del self._pending[key]
            older, self._files[key] = self._files.get(key, []), [self._path(
                f"{TRIALS_FILE}/{name}")]
            for part, table in itertools.product(older, (TRIALS_FILE, EPOCHS_FILE)):
                stale = self._path(f"{table}/{posixpath.basename(part)}")
                if self._fs.get_file_info(stale).type == pafs.FileType.File:
                    self._fs.delete_file(stale)

    def trials(self) -> pa.Table:
        """This study's trial rows (``TRIALS_SCHEMA``)."""
        return pa.Table.from_pylist(list(self._trials.values()), schema=TRIALS_SCHEMA)

    def epochs(self) -> pa.Table:
        """This study's epoch rows (``EPOCHS_SCHEMA``), ordered by trial then epoch."""
        rows = [r for key in self._trials for r in self._epochs[key]]
        return pa.Table.from_pylist(rows, schema=EPOCHS_SCHEMA)

    def trial_ids(self) -> set[str]:
        """The trial ids of this study present in the store."""
        return {tid for _, tid in self._trials}


def new_part_name() -> str:
    """A fresh part file name: UTC time (so names sort oldest first) and a random suffix."""
    return (f"{PART_PREFIX}{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}-"
            f"{uuid.uuid4().hex[:12]}.parquet")


def publish(fs: pafs.FileSystem, final: str, tmp: str, data: pa.Table) -> None:
    """Make the Parquet file ``final`` appear whole: on a local disk written to ``tmp`` and
    renamed (``tmp`` removed whatever happens); on an object store an upload is published
    atomically when it completes (there is no rename there)."""
    if not isinstance(fs, pafs.LocalFileSystem):
        pq.write_table(data, where=final, filesystem=fs)
        return
    try:
        pq.write_table(data, where=tmp, filesystem=fs)
        fs.move(tmp, final)
    finally:
        if fs.get_file_info(tmp).type == pafs.FileType.File:
            fs.delete_file(tmp)
