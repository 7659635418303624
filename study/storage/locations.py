"""Locations of a study (``storage`` and ``results``): local paths or pyarrow.fs URIs, possibly
with query parameters (``s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http``).

Local paths are made absolute once, at ``run``, so a study resumed from another working
directory writes to the same place; both are probed for writing before any trial runs.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from trainables.errors import InputError

if TYPE_CHECKING:
    from study.spec.model import StudySpec

CHECK_TIMEOUT_S = 30.0


class LocationError(InputError, ValueError):
    """A location that cannot be opened or written; the message names the field."""


def is_uri(location: str) -> bool:
    """Whether ``location`` is a URI (``scheme://...``) rather than a local path."""
    return "://" in location


def resolve_location(location: str) -> str:
    """A URI as given; a local path with ``~`` expanded, made absolute."""
    if is_uri(location):
        return location
    return os.path.abspath(os.path.expanduser(location))


def resolve_paths(spec: StudySpec) -> StudySpec:
    """``spec`` with local ``storage`` and ``results`` made absolute (``~`` expanded), once,
    at ``run``: the saved spec then names the same places whoever resumes, from wherever."""
    return spec.model_copy(update={"storage": resolve_location(spec.storage),
                                   "results": resolve_location(spec.results)})


def check_locations(spec: StudySpec) -> None:
    """Refuse, before any trial, ``results`` or ``storage`` that cannot be written (a
    :class:`LocationError` naming the field); leaves nothing behind."""
    check_writable(spec.results_path, "results")
    check_writable(spec.storage_path, "storage")


def join_location(base: str, *parts: str) -> str:
    """``base`` joined with ``parts`` on its path (a URI's query string stays last)."""
    if not is_uri(base):
        return os.path.join(os.path.expanduser(base), *parts)
    split = urlsplit(base)
    path = posixpath.join(split.path or "/", *parts)
    return urlunsplit(split._replace(path=path))


def filesystem(location: str, field: str = "location") -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of ``location``; :class:`LocationError` names
    ``field`` when the scheme is unknown or its driver (e.g. Hadoop for hdfs://) is missing."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), resolve_location(location)
    hdfs = location.startswith(("hdfs://", "viewfs://"))
    try:
        with _native_stderr_silenced() if hdfs else contextlib.nullcontext():
            return pafs.FileSystem.from_uri(location)
    except (OSError, ValueError) as err:  # ArrowInvalid is a ValueError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LocationError(f"{field}: cannot open {location!r}: {reason}") from None


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """libhdfs prints dozens of dlopen lines to fd 2 when Java is missing; the error we raise
    says it in one."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_writable(location: str, field: str, *, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Write and delete a probe file under ``location``; raise :class:`LocationError`
    naming ``field`` if that fails or takes longer than ``timeout_s`` (an object store that
    does not answer). Directories created for the probe are removed again."""
    outcome: Future[None] = Future()

    def probe() -> None:
        try:
            outcome.set_result(_probe(location, field))
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            outcome.set_exception(err)

    threading.Thread(target=probe, daemon=True, name=f"check-{field}").start()
    try:
        outcome.result(timeout_s)
    except FutureTimeout:
        raise LocationError(f"{field}: no answer from {location!r} within {timeout_s:g} s "
                            f"(is the storage endpoint reachable?)") from None


def _probe(location: str, field: str) -> None:
    fs, path = filesystem(location, field)
    path = path.rstrip("/") or "/"
    created = _missing_ancestors(fs, path, field)
    try:
        fs.create_dir(path, recursive=True)
        probe = f"{path}/.dpstudy-write-check-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LocationError(f"{field}: cannot write to {location!r}: {reason}") from None
    finally:
        # Only the directories this check made, deepest first, and only if still empty:
        # another study sharing the root may have written into one meanwhile (pyarrow's
        # delete_dir would delete its files). On object stores a directory is only a prefix
        # (or an empty marker), so it is left alone; it vanishes with its last object.
        for directory in created if fs.type_name == "local" else []:
            with contextlib.suppress(OSError):  # not empty, or already gone
                os.rmdir(directory)


def _missing_ancestors(fs: pafs.FileSystem, path: str, field: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, deepest first. A regular file on
    the way is an error."""
    missing: list[str] = []
    for current in (path, *map(str, PurePosixPath(path).parents)):
        if current in ("/", "."):
            break
        try:
            kind = fs.get_file_info(current).type
        except (OSError, ValueError) as err:
            raise LocationError(f"{field}: cannot access {current!r}: "
                                f"{str(err).strip().splitlines()[0]}") from None
        if kind == pafs.FileType.File:
            raise LocationError(f"{field}: {current!r} is a file, not a directory "
                                f"(got {path!r})")
        if kind == pafs.FileType.Directory:
            break
        missing.append(current)
    return missing
