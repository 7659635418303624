"""The documented, versioned Parquet schema of a study's results: ``trials.parquet`` (keys
``study`` + ``trial_id``), ``epochs.parquet`` (plus ``epoch``) and ``audits.parquet``. Every
column carries its ``doc`` and ``unit`` (also in ``docs/results-schema.md``) and every file
:data:`SCHEMA_VERSION`; :func:`coerce_row` checks a row before it is written,
:func:`conform_table` a table read back (older versions' files included)."""

from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata
import math
import numbers
from collections.abc import Callable
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 2  # 2: validation metrics, budget_used, stage, config_id, selection,
#                      DP validation score (val_accuracy_dp, val_noise, val_releases)
SCHEMA_VERSION_KEY = "dpstudy.schema_version"
STUDY_METADATA_KEY = "dpstudy.study"  # the study a trial part belongs to
TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
PART_PREFIX = "part-"
STATUSES = ("completed", "stopped", "failed")
AUDITS_FILE = "audits.parquet"
AUDIT_MODES = ("white-box", "black-box")
_ALLOWED = {"status": STATUSES, "mode": AUDIT_MODES}  # values a row's column must take

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
    *map(TRIALS_SCHEMA.field, ("study", "trial_id")),  # the same fields as in trials
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

AUDITS_SCHEMA = _schema("audits", [
    TRIALS_SCHEMA.field("study"),
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
    *map(TRIALS_SCHEMA.field, ("noise_multiplier", "clip_norm", "sample_rate")),
    _field("steps", _I, "optimizer steps of the audited run", "steps"),
    *map(TRIALS_SCHEMA.field, ("prune_rate", "drop_rate")),
    _field("test_accuracy", _F, "test accuracy of the model trained with canaries",
           "fraction"),
    _field("wall_time_s", _F, "wall-clock time of the audit (build, train, score)",
           "seconds"),
    _field("node", _S, "host name of the Ray node that ran the audit"),
    _field("seed", _I, "audit seed (canary draw and inclusion)"),
    TRIALS_SCHEMA.field("version"),
    _field("finished_at", _TS, "when the audit finished", "UTC timestamp"),
])

SCHEMAS = {TRIALS_FILE: TRIALS_SCHEMA, EPOCHS_FILE: EPOCHS_SCHEMA, AUDITS_FILE: AUDITS_SCHEMA}


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


def coerce_row(schema: pa.Schema, row: dict[str, Any], what: str) -> dict[str, Any]:
    """Check ``row`` against ``schema`` (a ``status`` or ``mode`` among the allowed) and return
    a full, typed row (missing -> None)."""
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
    for name, allowed in _ALLOWED.items():
        if name in out and out[name] not in allowed:
            raise ValueError(f"{what}: {name} must be one of {allowed}, got {out[name]!r}")
    return out


def conform_table(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
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
        try:
            columns.append(table[f.name].cast(f.type) if f.name in table.column_names
                           else pa.nulls(len(table), f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise ValueError(f"{where}: column {f.name!r} must be {f.type}, found "
                             f"{table.schema.field(f.name).type} ({err})") from None
    check_keys(table, schema, where)
    return pa.Table.from_arrays(columns, schema=schema)


def check_keys(table: pa.Table, schema: pa.Schema, where: str) -> None:
    """Refuse nulls in the key (non-nullable) columns of ``schema`` that ``table`` has."""
    keys = [f.name for f in schema if not f.nullable]
    if any(table[name].null_count for name in keys if name in table.column_names):
        raise ValueError(f"{where}: key columns {keys} must not be null")


