"""The audits table (``dpstudy audit``): ``RESULTS/audits.parquet``, one immutable part per
audit, so concurrent audits sharing a results root never overwrite each other."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from study.storage.read import locate, part_files, read_file
from study.storage.schema import (
    AUDITS_FILE,
    AUDITS_SCHEMA,
    PART_PREFIX,
    coerce_row,
    package_version,
)
from study.storage.store import new_part_name, publish


def read_audits(uri: str) -> pa.Table:
    """Every audit of a results directory/URI (``audits.parquet``: one immutable part per
    audit, or a single file written by older versions), or of one ``.parquet`` path."""
    fs, path, kind = locate(uri, AUDITS_FILE, table="audits")
    if kind == pafs.FileType.File:
        return read_file(fs, path, AUDITS_SCHEMA)
    tables = [read_file(fs, part, AUDITS_SCHEMA) for part in part_files(fs, path)]
    return pa.concat_tables(tables) if tables else AUDITS_SCHEMA.empty_table()


def append_audit(uri: str, row: dict[str, Any]) -> dict[str, Any]:
    """Add one audit row to ``audits.parquet`` in ``uri`` as a new immutable part; returns it
    typed. The row is checked against :data:`AUDITS_SCHEMA` before anything is written; an
    ``audit_id`` already present for the study is refused rather than duplicated."""
    row = {"version": package_version(), "finished_at": dt.datetime.now(dt.timezone.utc), **row}
    typed = coerce_row(AUDITS_SCHEMA, row, "audit row")
    fs, directory, kind = locate(uri, AUDITS_FILE)
    known = [] if kind == pafs.FileType.NotFound else read_audits(uri).to_pylist()
    if any((r["study"], r["audit_id"]) == (typed["study"], typed["audit_id"]) for r in known):
        raise ValueError(f"audit row: audit_id {typed['audit_id']!r} already recorded for "
                         f"study {typed['study']!r} in {directory}")
    if kind == pafs.FileType.File:
        raise ValueError(f"{directory}: a single-file audits table from an older dpstudy; "
                         f"move it into {directory}/{PART_PREFIX}legacy.parquet to append")
    fs.create_dir(directory, recursive=True)
    name = new_part_name()
    publish(fs, f"{directory}/{name}", f"{directory}/.{name}.tmp",
            pa.Table.from_pylist([typed], schema=AUDITS_SCHEMA))
    return typed
