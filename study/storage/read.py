"""Reading a results directory: its tables as ``pyarrow.dataset`` scans of part files, each
trial seen once (its newest part, see :mod:`study.storage.store`), every part checked against
the schema. Single-file tables (dpstudy < 0.2) and one ``.parquet`` file are read too."""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from study.storage.locations import filesystem
from study.storage.schema import (
    EPOCHS_FILE,
    PART_PREFIX,
    SCHEMAS,
    STUDY_METADATA_KEY,
    TRIALS_FILE,
    TRIALS_SCHEMA,
    check_keys,
    conform_table,
)


def read_file(fs: pafs.FileSystem, path: str, schema: pa.Schema, *,
              footer: bool = False) -> pa.Table:
    """One Parquet file (only its footer's schema, as an empty table, if ``footer``),
    conformed to ``schema`` (a ``ValueError`` naming it if it does not fit)."""
    try:
        table = (pq.read_schema(path, filesystem=fs).empty_table() if footer
                 else pq.read_table(path, filesystem=fs))
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    return conform_table(table, schema, path)


def part_files(fs: pafs.FileSystem, directory: str) -> list[str]:
    """Visible part files of a table directory, oldest name first."""
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File
                  and i.base_name.startswith(PART_PREFIX) and i.base_name.endswith(".parquet"))


def scan_parts(fs: pafs.FileSystem, files: list[str], schema: pa.Schema,
               columns: list[str]) -> pa.Table:
    """``columns`` (plus ``__filename``) of the part ``files`` read as one
    ``pyarrow.dataset`` of ``schema``: columns a part lacks read as null."""
    for path in files:  # each footer fits (newer version, unknown or missing key columns)
        read_file(fs, path, schema, footer=True)
    dataset = ds.dataset(files, schema=schema, filesystem=fs, format="parquet")
    try:
        table = dataset.to_table(columns=[*columns, "__filename"])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        for path in files:  # name the file and column that does not fit
            read_file(fs, path, schema)
        raise
    check_keys(table, schema, files[0])
    return table


def trial_parts(fs: pafs.FileSystem, base: str,
                study: str | None = None) -> dict[tuple[str, str], list[str]]:
    """For a results directory: ``(study, trial_id) ->`` its trial parts (``study``'s only,
    if given), oldest name first (all but the newest are superseded, see
    :mod:`study.storage.store`). Reads only the key columns."""
    files = part_files(fs, f"{base}/{TRIALS_FILE}")
    if not files:
        return {}
    parts: dict[tuple[str, str], list[str]] = {}
    for row in scan_parts(fs, files, TRIALS_SCHEMA, ["study", "trial_id"]).to_pylist():
        if study in (None, row["study"]):
            parts.setdefault((row["study"], row["trial_id"]), []).append(row["__filename"])
    return {key: sorted(paths, key=posixpath.basename) for key, paths in parts.items()}


def read_newest(fs: pafs.FileSystem, base: str, which: str,
                parts: dict[tuple[str, str], list[str]]) -> pa.Table:
    """The ``which`` rows (trials or epochs) of each trial's newest part in ``parts`` (see
    :func:`trial_parts`; a trial part, or the epochs part of the same name: a trial recorded
    without epochs has none)."""
    schema = SCHEMAS[which]
    newest = {key: paths[-1] for key, paths in parts.items()}
    files = sorted({f"{base}/{which}/{posixpath.basename(p)}" for p in newest.values()})
    if which == EPOCHS_FILE:
        files = [f for f in files if fs.get_file_info(f).type == pafs.FileType.File]
    if not files:
        return schema.empty_table()
    table = scan_parts(fs, files, schema, schema.names)
    wanted = pa.array([f"{s}/{t}@{posixpath.basename(p)}" for (s, t), p in newest.items()],
                      pa.string())
    names = pa.array([posixpath.basename(f) for f in table["__filename"].to_pylist()],
                     pa.string())
    keys = pc.binary_join_element_wise(table["study"], table["trial_id"], "/")
    tags = pc.binary_join_element_wise(keys, names, "@")
    table = table.filter(pc.is_in(tags, value_set=wanted))
    return table.drop_columns(["__filename"]).cast(schema)


def locate(uri: str, which: str, *,
           table: str = "") -> tuple[pafs.FileSystem, str, pafs.FileType]:
    """The filesystem, path and file type of the table ``which`` (e.g. ``trials.parquet``)
    of a results directory; a ``.parquet`` path given as ``uri`` is that file itself, or,
    when a directory, a table of the results directory holding it. With ``table``, a
    missing table is a ``FileNotFoundError`` naming it."""
    fs, path = filesystem(uri, "results")
    path = path.rstrip("/")
    kind = fs.get_file_info(path).type
    if not (path.endswith(".parquet") and kind == pafs.FileType.File):
        if path.endswith(".parquet") and kind == pafs.FileType.Directory:
            path = posixpath.dirname(path)  # RESULTS/trials.parquet given for RESULTS
        path = f"{path}/{which}"
        kind = fs.get_file_info(path).type
    if table and kind not in (pafs.FileType.File, pafs.FileType.Directory):
        raise FileNotFoundError(f"no {table} table at {uri!r} (looked for {path})")
    return fs, path, kind


def _read_layout(uri: str, which: str) -> pa.Table:
    """Trials or epochs of a results directory (part files, newest per trial) or of one
    ``.parquet`` file."""
    fs, path, kind = locate(uri, which, table="results")
    if kind == pafs.FileType.File:  # one file, or a single-file table (dpstudy < 0.2)
        return read_file(fs, path, SCHEMAS[which])
    base = posixpath.dirname(path)
    return read_newest(fs, base, which, trial_parts(fs, base))


def read_metadata(uri: str, study: str | None = None) -> dict[str, str]:
    """The file-level metadata of ``study``'s newest trial part in ``trials.parquet`` (or of
    a single-file table): e.g. the study's privacy statement. Every part carries the
    statement as it stood when the part was written, so the newest is the current one."""
    fs, path, kind = locate(uri, TRIALS_FILE, table="results")
    for candidate in [path] if kind == pafs.FileType.File else part_files(fs, path)[::-1]:
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

