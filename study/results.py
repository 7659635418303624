"""The results store: the one module that owns the Parquet schema of a study's results.

A study directory holds ``trials.parquet`` (one row per trial, key ``study`` + ``trial_id``)
and ``epochs.parquet`` (one row per trial per epoch, key ``study`` + ``trial_id`` +
``epoch``); every column is documented in ``docs/results-schema.md``.
:class:`ResultsStore` keeps the rows in memory keyed by trial, upserts whole trials (a
retried or resumed trial never duplicates) and rewrites both files atomically on
:meth:`ResultsStore.flush`: each file is written to ``<name>.tmp-<uuid>`` and then moved
over the final name, so a reader never sees a partial file.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata
import math
import numbers
import os
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = "dpstudy.schema_version"
TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
STATUSES = ("completed", "stopped", "failed")

_F, _I, _S, _TS = pa.float64(), pa.int64(), pa.string(), pa.timestamp("us", tz="UTC")
_B = pa.bool_()
_UTC = dt.timezone.utc


def _field(name: str, type_: pa.DataType, doc: str, unit: str = "", key: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=not key, metadata={"doc": doc, "unit": unit})


def _schema(table: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION),
                                       "dpstudy.table": table})


TRIALS_SCHEMA = _schema("trials", [
    _field("study", _S, "study name", key=True),
    _field("trial_id", _S, "trial id, unique within the study", key=True),
    _field("status", _S, "completed | stopped (early, by the scheduler) | failed", key=True),
    _field("prune_rate", _F, "fraction of weights removed before training", "fraction"),
    _field("drop_rate", _F, "fraction of gradient coordinates dropped per step", "fraction"),
    _field("clip_norm", _F, "per-sample gradient clipping bound C", "L2 norm"),
    _field("noise_multiplier", _F, "Gaussian noise std divided by clip_norm", "ratio"),
    _field("learning_rate", _F, "optimizer learning rate"),
    _field("batch_size", _I, "expected (logical) batch size", "examples"),
    _field("sample_rate", _F, "Poisson sampling probability q", "probability"),
    _field("epsilon_target", _F, "privacy budget the trial was calibrated for", "epsilon"),
    _field("epsilon_spent", _F, "epsilon spent at the end of training", "epsilon"),
    _field("delta", _F, "delta of the (epsilon, delta) guarantee", "probability"),
    _field("accountant", _S, "privacy accountant (prv | rdp)"),
    _field("steps", _I, "optimizer steps taken", "steps"),
    _field("epochs", _F, "epochs trained (steps * sample_rate)", "epochs"),
    _field("density", _F, "fraction of weights trainable after pruning", "fraction"),
    _field("test_accuracy", _F, "test accuracy after the last epoch", "fraction"),
    _field("best_test_accuracy", _F, "best test accuracy over all epochs", "fraction"),
    _field("test_loss", _F, "test loss after the last epoch", "nats"),
    _field("wall_time_s", _F, "wall-clock training time", "seconds"),
    _field("samples_per_s", _F, "training throughput", "examples/second"),
    _field("device", _S, "torch device the trial ran on (cpu, cuda:0, ...)"),
    _field("node", _S, "host name of the Ray node"),
    _field("seed", _I, "random seed"),
    _field("reproducible_noise", _B, "true: DP noise and batch sampling seeded from seed (the "
           "guarantee then assumes the seed stays secret); false: from a secret OS-random seed"),
    _field("version", _S, "dpstudy package version that produced the row"),
    _field("error", _S, "error message; null unless status is failed"),
    _field("pruning_criterion", _S, "pruning criterion (random | magnitude | snip)"),
    _field("pruning_scope", _S, "pruning scope (global | layerwise)"),
    _field("pruning_granularity", _S, "pruning granularity (unstructured | structured)"),
    _field("dropping_criterion", _S, "gradient dropping criterion"),
    _field("model", _S, "model architecture name"),
    _field("dataset", _S, "dataset name"),
    _field("num_params", _I, "total number of weights", "parameters"),
    _field("trainable_params", _I, "weights left trainable after pruning", "parameters"),
    _field("finished_at", _TS, "when the trial finished", "UTC timestamp"),
])

EPOCHS_SCHEMA = _schema("epochs", [
    _field("study", _S, "study name", key=True),
    _field("trial_id", _S, "trial id, unique within the study", key=True),
    _field("epoch", _I, "epoch number, starting at 1", key=True),
    _field("test_accuracy", _F, "test accuracy after this epoch", "fraction"),
    _field("test_loss", _F, "test loss after this epoch", "nats"),
    _field("train_loss", _F, "mean training loss over this epoch", "nats"),
    _field("epsilon_spent", _F, "cumulative epsilon spent after this epoch", "epsilon"),
    _field("steps", _I, "cumulative optimizer steps after this epoch", "steps"),
    _field("wall_time_s", _F, "cumulative wall-clock time after this epoch", "seconds"),
    _field("samples_per_s", _F, "training throughput during this epoch", "examples/second"),
])


@functools.cache
def package_version() -> str:
    """The installed dpstudy version, or ``"0.1.0+unknown"`` when it is not installed."""
    try:
        return importlib.metadata.version("dpstudy")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0+unknown"


def _to_int(value: Any) -> int:
    if isinstance(value, numbers.Integral):
        return int(value)
    if not float(value).is_integer():
        raise ValueError("not an integer")
    return int(float(value))


def _to_time(value: Any) -> dt.datetime:
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, tz=_UTC)
    value = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    if not isinstance(value, dt.datetime):
        raise TypeError(f"expected a datetime, got {type(value).__name__}")
    return value.replace(tzinfo=_UTC) if value.tzinfo is None else value.astimezone(_UTC)


def _to_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {type(value).__name__}")
    return value


_COERCERS: dict[pa.DataType, Callable] = {_F: float, _I: _to_int, _S: str, _TS: _to_time,
                                          _B: _to_bool}


def _coerce(schema: pa.Schema, row: dict[str, Any], what: str) -> dict[str, Any]:
    """Check ``row`` against ``schema`` and return a full, typed row (missing -> None)."""
    unknown = sorted(set(row) - set(schema.names))
    if unknown:
        raise ValueError(f"{what}: unknown column(s) {unknown}; known: {schema.names}")
    out: dict[str, Any] = {}
    for f in schema:
        value = row.get(f.name)
        if value is None or (f.type != _F and isinstance(value, float) and math.isnan(value)):
            value = None
        else:
            try:
                value = _COERCERS[f.type](value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{what}: column {f.name!r} expects {f.type}, "
                                 f"got {value!r} ({err})") from None
        if value is None and not f.nullable:
            raise ValueError(f"{what}: column {f.name!r} is required")
        out[f.name] = value
    return out


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and path for a plain local path (``~`` expanded) or a pyarrow.fs URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def _conform(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Cast a table read from disk to ``schema``; columns added since it was written -> null."""
    meta = table.schema.metadata or {}
    version = int(meta.get(SCHEMA_VERSION_KEY.encode(), b"0"))
    if version > SCHEMA_VERSION:
        raise ValueError(f"{where}: schema version {version} is newer than this dpstudy "
                         f"understands ({SCHEMA_VERSION}); upgrade dpstudy")
    extra = sorted(set(table.column_names) - set(schema.names))
    if extra:
        raise ValueError(f"{where}: unexpected column(s) {extra}; is this a dpstudy file?")
    columns = [table[f.name].cast(f.type) if f.name in table.column_names
               else pa.nulls(len(table), f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _read(uri: str, name: str, schema: pa.Schema) -> pa.Table:
    fs, path = _resolve(uri)
    if not path.endswith(".parquet"):
        path = f"{path.rstrip('/')}/{name}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"no results table at {uri!r} (looked for {path})")
    return _conform(pq.read_table(path, filesystem=fs), schema, path)


def read_trials(uri: str) -> pa.Table:
    """Read ``trials.parquet`` from a results directory/URI, or from a ``.parquet`` path."""
    return _read(uri, TRIALS_FILE, TRIALS_SCHEMA)


def read_epochs(uri: str) -> pa.Table:
    """Read ``epochs.parquet`` from a results directory/URI, or from a ``.parquet`` path."""
    return _read(uri, EPOCHS_FILE, EPOCHS_SCHEMA)


class ResultsStore:
    """In-memory trials and epochs of one study, flushed atomically to Parquet.

    ``uri`` is the directory holding ``trials.parquet`` and ``epochs.parquet``: a local
    path (``~`` expanded) or a pyarrow.fs URI (``file:///abs``, ``s3://bucket/prefix``).
    Existing files are loaded on construction, so a resumed study merges with them; rows
    of other studies found there are kept as they are. One writer per directory.
    """

    def __init__(self, uri: str, study: str) -> None:
        self.uri, self.study = uri, study
        fs, path = _resolve(uri)
        self._fs, self._dir = fs, path.rstrip("/")
        self._trials: dict[tuple[str, str], dict[str, Any]] = {}
        self._epochs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._remove_leftovers()
        self._load()

    def _path(self, name: str) -> str:
        return f"{self._dir}/{name}"

    def _remove_leftovers(self) -> None:
        """Delete the ``*.parquet.tmp-*`` files of a killed writer."""
        for info in self._fs.get_file_info(pafs.FileSelector(self._dir, allow_not_found=True)):
            if info.type == pafs.FileType.File and ".parquet.tmp-" in info.base_name:
                self._fs.delete_file(info.path)

    def _existing(self, name: str, schema: pa.Schema) -> list[dict[str, Any]]:
        path = self._path(name)
        if self._fs.get_file_info(path).type != pafs.FileType.File:
            return []
        return _conform(pq.read_table(path, filesystem=self._fs), schema, path).to_pylist()

    def _load(self) -> None:
        for row in self._existing(TRIALS_FILE, TRIALS_SCHEMA):
            key = (row["study"], row["trial_id"])
            self._trials[key], self._epochs[key] = row, []
        for row in self._existing(EPOCHS_FILE, EPOCHS_SCHEMA):
            key = (row["study"], row["trial_id"])
            if key in self._trials:  # epochs of a trial whose row never landed are dropped
                self._epochs[key].append(row)

    def add_trial(self, row: dict, epochs: list[dict]) -> None:
        """Insert or replace (by ``trial_id``) one trial's row and all its epoch rows.

        ``study`` defaults to the store's study and ``version`` to the package version;
        other missing columns become null. Unknown keys raise ``ValueError``.
        """
        row = {"study": self.study, "version": package_version(), **row}
        if row["study"] != self.study:
            raise ValueError(f"trial row is for study {row['study']!r}, store is {self.study!r}")
        trial = _coerce(TRIALS_SCHEMA, row, "trial row")
        if trial["status"] not in STATUSES:
            raise ValueError(f"trial row: status must be one of {STATUSES}, "
                             f"got {trial['status']!r}")
        rows = [self._epoch_row(trial["trial_id"], e) for e in epochs]
        numbers = [r["epoch"] for r in rows]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"trial {trial['trial_id']!r}: duplicate epoch numbers {numbers}")
        key = (self.study, trial["trial_id"])
        self._trials[key], self._epochs[key] = trial, sorted(rows, key=lambda r: r["epoch"])

    def _epoch_row(self, trial_id: str, epoch: dict) -> dict[str, Any]:
        what = f"epoch row of trial {trial_id!r}"
        full = {"study": self.study, "trial_id": trial_id, **epoch}
        if str(full["trial_id"]) != trial_id or full["study"] != self.study:
            raise ValueError(f"{what}: study/trial_id do not match the trial row")
        return _coerce(EPOCHS_SCHEMA, full, what)

    def _all_trials(self) -> pa.Table:
        return pa.Table.from_pylist(list(self._trials.values()), schema=TRIALS_SCHEMA)

    def _all_epochs(self) -> pa.Table:
        rows = [r for key in self._trials for r in self._epochs[key]]
        return pa.Table.from_pylist(rows, schema=EPOCHS_SCHEMA)

    def flush(self) -> None:
        """Rewrite both files atomically (temporary file, then move over the final name)."""
        self._fs.create_dir(self._dir, recursive=True)
        staged = []
        try:
            for name, table in ((EPOCHS_FILE, self._all_epochs()),
                                (TRIALS_FILE, self._all_trials())):
                tmp = self._path(f"{name}.tmp-{uuid.uuid4().hex}")
                staged.append((tmp, self._path(name)))
                pq.write_table(table, where=tmp, filesystem=self._fs)
            # epochs first: a crash in between leaves trials.parquet at the old state
            for tmp, final in list(staged):
                self._fs.move(tmp, final)
                staged.remove((tmp, final))
        finally:
            for tmp, _ in staged:
                if self._fs.get_file_info(tmp).type == pafs.FileType.File:
                    self._fs.delete_file(tmp)

    def trials(self) -> pa.Table:
        """This study's trial rows (``TRIALS_SCHEMA``)."""
        return self._mine(self._all_trials())

    def epochs(self) -> pa.Table:
        """This study's epoch rows (``EPOCHS_SCHEMA``), ordered by trial then epoch."""
        return self._mine(self._all_epochs())

    def _mine(self, table: pa.Table) -> pa.Table:
        return table.filter(pc.equal(table["study"], self.study))

    def trial_ids(self) -> set[str]:
        """The trial ids of this study present in the store."""
        return {tid for study, tid in self._trials if study == self.study}
