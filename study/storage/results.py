"""The results store: the one module that owns the Parquet schema of a study's results.

A results directory holds two tables, each a directory of Parquet part files (the layout
Spark, pandas, DuckDB and polars read as one dataset)::

    RESULTS/trials.parquet/part-<UTC stamp>-<uuid>.parquet   one row: one trial
    RESULTS/epochs.parquet/part-<same name>.parquet          that trial's epoch rows

Keys: ``study`` + ``trial_id`` (trials), plus ``epoch`` (epochs); every column is documented
in ``docs/results-schema.md``. A part is written once and never modified: a trial recorded
again (a retried or resumed trial) gets a new part, with a later name, and its older parts
are deleted after the new one is published. Readers keep, per ``(study, trial_id)``, the
trial part with the greatest name and the epochs part of the same name, so a reader that
runs between the two steps still sees each trial once. Nothing is ever rewritten in place,
so any number of studies (and their drivers) can share one results directory, on a local
disk or on an object store without atomic rename.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata
import math
import numbers
import posixpath
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from study.storage.locations import filesystem

SCHEMA_VERSION = 2  # 2: validation metrics, budget_used, stage, config_id, selection,
#                      DP validation score (val_accuracy_dp, val_noise, val_releases)
SCHEMA_VERSION_KEY = "dpstudy.schema_version"
STUDY_METADATA_KEY = "dpstudy.study"  # the study a trial part belongs to
TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
PART_PREFIX = "part-"
STATUSES = ("completed", "stopped", "failed")
STAGES = ("search", "confirm")
SELECTION_SPLITS = ("validation", "test", "none")

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
    _field("stage", _S, "search (a trial of the search) | confirm (a re-run of a chosen "
           "configuration with a fresh seed)"),
    _field("config_id", _S, "the configuration a row trains: the search trial id it comes "
           "from; the seeds of one configuration share it"),
    _field("prune_rate", _F, "fraction of weights removed before training", "fraction"),
    _field("drop_rate", _F, "fraction of gradient coordinates dropped per step", "fraction"),
    _field("clip_norm", _F, "per-sample gradient clipping bound C", "L2 norm"),
    _field("noise_multiplier", _F, "Gaussian noise std divided by clip_norm", "ratio"),
    _field("learning_rate", _F, "optimizer learning rate"),
    _field("batch_size", _I, "expected (logical) batch size", "examples"),
    _field("physical_batch_size", _I, "images per forward/backward pass (null: the whole "
           "logical batch in one pass); a resource setting, results do not depend on it",
           "images"),
    _field("augmentation_multiplicity", _I, "augmented views per example whose gradients "
           "are averaged before clipping (1: no augmentation)", "views"),
    _field("ema_decay", _F, "decay of the parameter average that is evaluated and released "
           "(null: no averaging, the trained weights are)", "ratio"),
    _field("precision", _S, "fp32 | bf16 (autocast forward/backward; per-sample gradients, "
           "clipping and noise in float32)"),
    _field("sample_rate", _F, "Poisson sampling probability q", "probability"),
    _field("epsilon_target", _F, "privacy budget the trial was calibrated for", "epsilon"),
    _field("epsilon_spent", _F, "epsilon spent at the end of training", "epsilon"),
    _field("delta", _F, "delta of the (epsilon, delta) guarantee", "probability"),
    _field("accountant", _S, "privacy accountant (prv | rdp)"),
    _field("steps", _I, "optimizer steps taken", "steps"),
    _field("epochs", _F, "epochs trained (steps * sample_rate)", "epochs"),
    _field("budget_used", _F, "epsilon_spent / epsilon_target", "fraction"),
    _field("density", _F, "fraction of weights trainable after pruning", "fraction"),
    _field("val_accuracy", _F, "validation accuracy after the last epoch (what the search "
           "selects on)", "fraction"),
    _field("best_val_accuracy", _F, "best validation accuracy over all epochs", "fraction"),
    _field("val_loss", _F, "validation loss after the last epoch", "nats"),
    _field("val_accuracy_dp", _F, "DP validation score: (correct + Gaussian noise) / n, "
           "released once at the end of the trial; null without validation.noise", "fraction"),
    _field("val_noise", _F, "std of the DP score's Gaussian noise on the count of correct "
           "predictions (sensitivity 1)", "count"),
    _field("val_releases", _I, "DP validation scores released (each counted in "
           "epsilon_spent)", "releases"),
    _field("test_accuracy", _F, "test accuracy after the last epoch", "fraction"),
    _field("best_test_accuracy", _F, "best test accuracy over all epochs", "fraction"),
    _field("test_loss", _F, "test loss after the last epoch", "nats"),
    _field("wall_time_s", _F, "wall-clock training time", "seconds"),
    _field("samples_per_s", _F, "training throughput", "examples/second"),
    _field("device", _S, "torch device the trial ran on (cpu, cuda:0, ...)"),
    _field("node", _S, "host name of the Ray node"),
    _field("seed", _I, "random seed"),
    _field("params", _S, "the sampled hyperparameters of the configuration, as JSON (what "
           "a confirmation run re-trains)"),
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
    _field("selection_metric", _S, "the study's objective metric(s) the search selected on, "
           "comma-separated"),
    _field("selection_split", _S, "the split the selection metric is computed on: "
           "validation | test (explicitly allowed by the spec) | none"),
])

EPOCHS_SCHEMA = _schema("epochs", [
    _field("study", _S, "study name", key=True),
    _field("trial_id", _S, "trial id, unique within the study", key=True),
    _field("epoch", _I, "epoch number, starting at 1", key=True),
    _field("val_accuracy", _F, "validation accuracy after this epoch", "fraction"),
    _field("val_loss", _F, "validation loss after this epoch", "nats"),
    _field("test_accuracy", _F, "test accuracy after this epoch", "fraction"),
    _field("test_loss", _F, "test loss after this epoch", "nats"),
    _field("train_loss", _F, "mean training loss over this epoch", "nats"),
    _field("epsilon_spent", _F, "cumulative epsilon spent after this epoch", "epsilon"),
    _field("budget_used", _F, "epsilon_spent / epsilon_target after this epoch", "fraction"),
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
    missing = [f.name for f in schema if not f.nullable and f.name not in table.column_names]
    if missing:
        raise ValueError(f"{where}: required column(s) {missing} missing; "
                         f"not a dpstudy {schema.metadata[b'dpstudy.table'].decode()} table")
    columns = []
    for f in schema:
        if f.name not in table.column_names:
            columns.append(pa.nulls(len(table), f.type))
            continue
        try:
            columns.append(table[f.name].cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise ValueError(f"{where}: column {f.name!r} must be {f.type}, found "
                             f"{table.schema.field(f.name).type} ({err})") from None
    if any(table[f.name].null_count for f in schema
           if not f.nullable and f.name in table.column_names):
        raise ValueError(f"{where}: key columns {[f.name for f in schema if not f.nullable]} "
                         f"must not be null")
    return pa.Table.from_arrays(columns, schema=schema)


def _read_file(fs: pafs.FileSystem, path: str, schema: pa.Schema) -> pa.Table:
    try:
        table = pq.read_table(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    return _conform(table, schema, path)


def _parts(fs: pafs.FileSystem, directory: str) -> list[str]:
    """Visible part files of a table directory, oldest name first."""
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File
                  and i.base_name.startswith(PART_PREFIX) and i.base_name.endswith(".parquet"))


def _check_part(fs: pafs.FileSystem, path: str, schema: pa.Schema) -> None:
    """A part's own schema (its footer) fits ``schema``: see :func:`_conform`."""
    try:
        physical = pq.read_schema(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    _conform(physical.empty_table(), schema, path)


def _scan(fs: pafs.FileSystem, files: list[str], schema: pa.Schema,
          columns: list[str]) -> pa.Table:
    """``columns`` (plus ``__filename``) of the part ``files`` read as one
    ``pyarrow.dataset`` of ``schema``: columns a part lacks read as null."""
    for path in files:
        _check_part(fs, path, schema)
    dataset = ds.dataset(files, schema=schema, filesystem=fs, format="parquet")
    try:
        table = dataset.to_table(columns=[*columns, "__filename"])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        for path in files:  # name the file and column that does not fit
            _read_file(fs, path, schema)
        raise
    if any(table[f.name].null_count for f in schema if not f.nullable and f.name in columns):
        raise ValueError(f"{files[0]}: key columns {[f.name for f in schema if not f.nullable]}"
                         f" must not be null")
    return table


def _from_newest(table: pa.Table, newest: dict[tuple[str, str], str]) -> pa.Table:
    """The rows of ``table`` (read by :func:`_scan`) that come from their trial's newest
    part (a trial part or the epoch part of the same name), without ``__filename``."""
    wanted = pa.array([f"{s}/{t}@{posixpath.basename(p)}" for (s, t), p in newest.items()],
                      pa.string())
    names = pa.array([posixpath.basename(f) for f in table["__filename"].to_pylist()],
                     pa.string())
    tags = pc.binary_join_element_wise(_keys(table), names, "@")
    return table.filter(pc.is_in(tags, value_set=wanted)).drop_columns(["__filename"])


def _newest_parts(fs: pafs.FileSystem, base: str) -> dict[tuple[str, str], str]:
    """For a results directory: ``(study, trial_id) -> newest trial part`` (older parts of
    a trial are superseded, see module doc). Reads only the key columns."""
    files = _parts(fs, f"{base}/{TRIALS_FILE}")
    newest: dict[tuple[str, str], str] = {}
    if not files:
        return newest
    keys = _scan(fs, files, TRIALS_SCHEMA, ["study", "trial_id"])
    for study, trial, path in zip(keys["study"].to_pylist(), keys["trial_id"].to_pylist(),
                                  keys["__filename"].to_pylist(), strict=True):
        key = (study, trial)
        if key not in newest or posixpath.basename(path) > posixpath.basename(newest[key]):
            newest[key] = path
    return newest


def _read_layout(uri: str, which: str) -> pa.Table:
    """Trials or epochs of a results directory (part files, newest per trial) or of one
    ``.parquet`` file."""
    schema = TRIALS_SCHEMA if which == TRIALS_FILE else EPOCHS_SCHEMA
    fs, path = filesystem(uri, "results")
    path = path.rstrip("/")
    info = fs.get_file_info(path)
    if path.endswith(".parquet") and info.type == pafs.FileType.File:
        return _read_file(fs, path, schema)
    if path.endswith(".parquet") and info.type == pafs.FileType.Directory:
        path = posixpath.dirname(path)  # RESULTS/trials.parquet given for RESULTS
    table_path = f"{path}/{which}"
    kind = fs.get_file_info(table_path).type
    if kind == pafs.FileType.File:  # a single-file table (dpstudy < 0.2 wrote these)
        return _read_file(fs, table_path, schema)
    if kind != pafs.FileType.Directory:
        raise FileNotFoundError(f"no results table at {uri!r} (looked for {table_path})")
    newest = _newest_parts(fs, path)
    files = sorted({f"{table_path}/{posixpath.basename(p)}" for p in newest.values()})
    if which == EPOCHS_FILE:  # a trial recorded without epochs has no epoch part
        files = [f for f in files if fs.get_file_info(f).type == pafs.FileType.File]
    if not files:
        return schema.empty_table()
    table = _from_newest(_scan(fs, files, schema, schema.names), newest)
    return table.cast(schema)


def _keys(table: pa.Table) -> pa.Array:
    return pc.binary_join_element_wise(table["study"], table["trial_id"], "/")


def read_metadata(uri: str, study: str | None = None) -> dict[str, str]:
    """The file-level metadata of ``study``'s newest trial part in ``trials.parquet`` (or of
    a single-file table): e.g. the study's privacy statement. Every part carries the
    statement as it stood when the part was written, so the newest is the current one."""
    fs, path = filesystem(uri, "results")
    path = path if path.endswith(".parquet") else f"{path.rstrip('/')}/{TRIALS_FILE}"
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        candidates = [path]
    elif info.type == pafs.FileType.Directory:
        parts = fs.get_file_info(pafs.FileSelector(path))
        candidates = sorted((p.path for p in parts if p.type == pafs.FileType.File
                             and p.base_name.endswith(".parquet")), reverse=True)
    else:
        raise FileNotFoundError(f"no results table at {uri!r} (looked for {path})")
    for candidate in candidates:
        meta = {k.decode(): v.decode() for k, v in
                (pq.read_schema(candidate, filesystem=fs).metadata or {}).items()}
        if study is None or meta.get(STUDY_METADATA_KEY, study) == study:
            return meta
    return {}


def read_trials(uri: str) -> pa.Table:
    """This results directory's trials (every study in it, newest part per trial), or one
    ``.parquet`` file's."""
    return _read_layout(uri, TRIALS_FILE)


def read_epochs(uri: str) -> pa.Table:
    """This results directory's epochs (those of each trial's newest part), or one
    ``.parquet`` file's."""
    return _read_layout(uri, EPOCHS_FILE)


class ResultsStore:
    """One study's trials and epochs, written as immutable per-trial part files.

    ``uri`` is the results directory: a local path (``~`` expanded) or a pyarrow.fs URI
    (``file:///abs``, ``s3://bucket/prefix?endpoint_override=...``). Existing parts of this
    study are loaded on construction, so a resumed study merges with them. Parts of other
    studies are never read back into this store, rewritten or deleted, so any number of
    studies may share one results directory. At most one writer per study (the study
    lock, :mod:`study.execution.lock`, ensures it).
    """

    def __init__(self, uri: str, study: str) -> None:
        self.uri, self.study = uri, study
        fs, path = filesystem(uri, "results")
        self._fs, self._dir = fs, path.rstrip("/")
        self._local = isinstance(fs, pafs.LocalFileSystem)
        self._trials: dict[tuple[str, str], dict[str, Any]] = {}
        self._epochs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._files: dict[tuple[str, str], list[str]] = {}  # written parts, per trial
        self._pending: list[tuple[str, str]] = []
        self.metadata: dict[str, str] = {}  # extra file metadata of trials.parquet
        self._remove_leftovers()
        self._load()

    def _path(self, name: str) -> str:
        return f"{self._dir}/{name}"

    def _staging(self, table: str) -> str:
        return self._path(f"{table}/.staging-{self.study}")

    def _remove_leftovers(self) -> None:
        """Delete this study's staged files of a killed writer (never another study's)."""
        for table in (TRIALS_FILE, EPOCHS_FILE):
            if self._local and self._fs.get_file_info(self._path(table)).type == \
                    pafs.FileType.Directory:
                self._fs.delete_dir_contents(self._staging(table), missing_dir_ok=True)

    def _load(self) -> None:
        for table in (TRIALS_FILE, EPOCHS_FILE):
            if self._fs.get_file_info(self._path(table)).type == pafs.FileType.File:
                raise ValueError(f"{self._path(table)}: a single-file results table (written by "
                                 f"dpstudy < 0.2); dpstudy now writes a directory of part files "
                                 f"there: move the file away or choose another results "
                                 f"directory")
        files = _parts(self._fs, self._path(TRIALS_FILE))
        if not files:
            return
        newest: dict[tuple[str, str], str] = {}
        for row in _scan(self._fs, files, TRIALS_SCHEMA, TRIALS_SCHEMA.names).to_pylist():
            key, path = (row["study"], row["trial_id"]), row.pop("__filename")
            if row["study"] != self.study:
                continue
            self._files.setdefault(key, []).append(path)
            if key not in newest or posixpath.basename(path) > posixpath.basename(newest[key]):
                newest[key], self._trials[key], self._epochs[key] = path, row, []
        for paths in self._files.values():
            paths.sort()
        epoch_parts = [self._path(f"{EPOCHS_FILE}/{posixpath.basename(p)}")
                       for p in sorted(set(newest.values()))]
        epoch_parts = [p for p in epoch_parts
                       if self._fs.get_file_info(p).type == pafs.FileType.File]
        if epoch_parts:
            epochs = _from_newest(_scan(self._fs, epoch_parts, EPOCHS_SCHEMA,
                                        EPOCHS_SCHEMA.names), newest)
            for row in epochs.to_pylist():
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
        if key not in self._pending:
            self._pending.append(key)

    def _epoch_row(self, trial_id: str, epoch: dict) -> dict[str, Any]:
        what = f"epoch row of trial {trial_id!r}"
        full = {"study": self.study, "trial_id": trial_id, **epoch}
        if str(full["trial_id"]) != trial_id or full["study"] != self.study:
            raise ValueError(f"{what}: study/trial_id do not match the trial row")
        return _coerce(EPOCHS_SCHEMA, full, what)

    def _part_schema(self) -> pa.Schema:
        """``TRIALS_SCHEMA`` with this study's name and ``metadata`` (a part's metadata)."""
        extra = {STUDY_METADATA_KEY: self.study, **self.metadata}
        return TRIALS_SCHEMA.with_metadata({**TRIALS_SCHEMA.metadata, **{
            k.encode(): v.encode() for k, v in extra.items()}})

    def _all_trials(self) -> pa.Table:
        return pa.Table.from_pylist(list(self._trials.values()), schema=TRIALS_SCHEMA)

    def _all_epochs(self) -> pa.Table:
        rows = [r for key in self._trials for r in self._epochs[key]]
        return pa.Table.from_pylist(rows, schema=EPOCHS_SCHEMA)

    def flush(self) -> None:
        """Write each trial added since the last flush as a new part (its epochs part first,
        then its trial part, each published whole), then delete its superseded parts."""
        for table in (TRIALS_FILE, EPOCHS_FILE):
            self._fs.create_dir(self._path(table), recursive=True)
        while self._pending:
            key = self._pending[0]
            name = new_part_name()
            epochs = pa.Table.from_pylist(self._epochs[key], schema=EPOCHS_SCHEMA)
            self._publish(EPOCHS_FILE, name, epochs)
            self._publish(TRIALS_FILE, name, pa.Table.from_pylist([self._trials[key]],
                                                                  schema=self._part_schema()))
            self._pending.pop(0)
            older, self._files[key] = self._files.get(key, []), [self._path(
                f"{TRIALS_FILE}/{name}")]
            for path in older:
                self._delete(path)
                self._delete(self._path(f"{EPOCHS_FILE}/{posixpath.basename(path)}"))

    def _publish(self, table: str, name: str, data: pa.Table) -> None:
        """Make ``table/name`` appear whole: staged and renamed locally; on object stores an
        upload is published atomically when it completes (there is no rename there)."""
        final = self._path(f"{table}/{name}")
        if not self._local:
            pq.write_table(data, where=final, filesystem=self._fs)
            return
        staging = self._staging(table)
        self._fs.create_dir(staging, recursive=True)
        tmp = f"{staging}/{name}"
        try:
            pq.write_table(data, where=tmp, filesystem=self._fs)
            self._fs.move(tmp, final)
        finally:
            self._delete(tmp)

    def _delete(self, path: str) -> None:
        if self._fs.get_file_info(path).type == pafs.FileType.File:
            self._fs.delete_file(path)

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


# --- audits.parquet: one row per empirical privacy audit (``dpstudy audit``) -----------

AUDITS_FILE = "audits.parquet"
AUDIT_MODES = ("white-box", "black-box")

AUDITS_SCHEMA = _schema("audits", [
    _field("study", _S, "study name", key=True),
    _field("audit_id", _S, "audit id, unique within the study", key=True),
    _field("trial_id", _S, "audited trial; null when the spec's fixed configuration was "
           "audited"),
    _field("mode", _S, "white-box (gradient canaries) | black-box (mislabeled images)",
           key=True),
    _field("canaries", _I, "canaries drawn (m); each included with probability 1/2",
           "canaries"),
    _field("included", _I, "canaries included in training", "canaries"),
    _field("confidence", _F, "confidence of the lower bound (1 - significance)",
           "probability"),
    _field("delta", _F, "delta of the claim and of the bound", "probability"),
    _field("epsilon_target", _F, "privacy budget of the audited configuration", "epsilon"),
    _field("epsilon_claimed", _F, "epsilon the accountant reports for the audited run",
           "epsilon"),
    _field("epsilon_audited", _F, "empirical lower bound on epsilon at `confidence`",
           "epsilon"),
    _field("violation", _I, "1 if epsilon_audited > epsilon_claimed (mechanism broken)",
           "flag"),
    _field("noise_multiplier", _F, "Gaussian noise std divided by clip_norm", "ratio"),
    _field("clip_norm", _F, "per-sample gradient clipping bound C", "L2 norm"),
    _field("sample_rate", _F, "Poisson sampling probability q", "probability"),
    _field("steps", _I, "optimizer steps of the audited run", "steps"),
    _field("prune_rate", _F, "fraction of weights removed before training", "fraction"),
    _field("drop_rate", _F, "fraction of gradient coordinates dropped per step", "fraction"),
    _field("test_accuracy", _F, "test accuracy of the model trained with canaries",
           "fraction"),
    _field("wall_time_s", _F, "wall-clock time of the audit (build, train, score)",
           "seconds"),
    _field("node", _S, "host name of the Ray node that ran the audit"),
    _field("seed", _I, "audit seed (canary draw and inclusion)"),
    _field("version", _S, "dpstudy package version that produced the row"),
    _field("finished_at", _TS, "when the audit finished", "UTC timestamp"),
])


def new_part_name() -> str:
    """A fresh part file name: UTC time (so names sort oldest first) and a random suffix."""
    return (f"{PART_PREFIX}{dt.datetime.now(_UTC).strftime('%Y%m%dT%H%M%S%fZ')}-"
            f"{uuid.uuid4().hex[:12]}.parquet")


def read_audits(uri: str) -> pa.Table:
    """Every audit of a results directory/URI (``audits.parquet``: one immutable part per
    audit, or a single file written by older versions), or of one ``.parquet`` path."""
    fs, path = filesystem(uri, "results")
    path = path.rstrip("/")
    if not path.endswith(".parquet"):
        path = f"{path}/{AUDITS_FILE}"
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        return _read_file(fs, path, AUDITS_SCHEMA)
    if kind != pafs.FileType.Directory:
        raise FileNotFoundError(f"no audits table at {uri!r} (looked for {path})")
    tables = [_read_file(fs, part, AUDITS_SCHEMA) for part in _parts(fs, path)]
    return pa.concat_tables(tables) if tables else AUDITS_SCHEMA.empty_table()


def append_audit(uri: str, row: dict[str, Any]) -> dict[str, Any]:
    """Add one audit row to ``audits.parquet`` in ``uri`` as a new immutable part (so
    concurrent audits sharing a results root never overwrite each other); returns it typed.

    The row is checked against :data:`AUDITS_SCHEMA` before anything is written; an
    ``audit_id`` already present for the study is refused rather than duplicated."""
    row = {"version": package_version(), "finished_at": dt.datetime.now(_UTC), **row}
    typed = _coerce(AUDITS_SCHEMA, row, "audit row")
    if typed["mode"] not in AUDIT_MODES:
        raise ValueError(f"audit row: mode must be one of {AUDIT_MODES}, got {typed['mode']!r}")
    fs, path = filesystem(uri, "results")
    directory = f"{path.rstrip('/')}/{AUDITS_FILE}"
    try:
        known = read_audits(uri).to_pylist()
    except FileNotFoundError:
        known = []
    if any((r["study"], r["audit_id"]) == (typed["study"], typed["audit_id"]) for r in known):
        raise ValueError(f"audit row: audit_id {typed['audit_id']!r} already recorded for "
                         f"study {typed['study']!r} in {directory}")
    if fs.get_file_info(directory).type == pafs.FileType.File:
        raise ValueError(f"{directory}: a single-file audits table from an older dpstudy; "
                         f"move it into {directory}/{PART_PREFIX}legacy.parquet to append")
    fs.create_dir(directory, recursive=True)
    name = new_part_name()
    final, tmp = f"{directory}/{name}", f"{directory}/.{name}.tmp"
    table = pa.Table.from_pylist([typed], schema=AUDITS_SCHEMA)
    if not isinstance(fs, pafs.LocalFileSystem):  # an object store publishes uploads whole
        pq.write_table(table, where=final, filesystem=fs)
        return typed
    try:
        pq.write_table(table, where=tmp, filesystem=fs)
        fs.move(tmp, final)
    finally:
        if fs.get_file_info(tmp).type == pafs.FileType.File:
            fs.delete_file(tmp)
    return typed
