"""Best-effort caches on disk, shared by the processes of a machine (trials, the driver).

Two things are worth keeping between the fresh processes a study starts:

- parsed datasets (:func:`parsed_arrays`): a bundled CSV takes seconds to parse and
  milliseconds to load as ``.npz``; kept under the dataset's root, keyed by a hash of the
  source file's content, so a changed source is parsed again;
- privacy calibrations (:func:`read_json` / :func:`write_json` under
  :func:`calibration_dir`): see :func:`trainables.accounting.cached_plan`, which checks
  every value it reads with the accountant before it trusts it.

Every write is atomic (a temporary file in the same folder, then ``os.replace``), so a
reader sees a whole file or none, even when the writer is killed; a file that cannot be
read or written is simply not cached: the caller computes the value again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

#: Environment variable naming the cache folder (default ``$XDG_CACHE_HOME/dpstudy``).
CACHE_ENV = "DPSTUDY_CACHE"
#: Sub-folder of a dataset's root that holds its parsed copies.
PARSED_FOLDER = "parsed"


def cache_root() -> str:
    """The folder of dpstudy's caches: ``$DPSTUDY_CACHE``, else ``$XDG_CACHE_HOME/dpstudy``
    (``~/.cache/dpstudy``)."""
    if os.environ.get(CACHE_ENV):
        return os.path.expanduser(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.join(os.path.expanduser(base), "dpstudy")


def calibration_dir() -> str:
    """Where privacy calibrations are kept (one JSON file per key)."""
    return os.path.join(cache_root(), "calibrations")


def key_digest(key: Any) -> str:
    """A file-name-safe digest of a JSON-serialisable key."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def write_atomic(path: str, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically (readable by its owner only); False when it
    cannot be written (the cache is then skipped, never an error)."""
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def read_json(path: str) -> Any | None:
    """The JSON value in ``path``, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def write_json(path: str, value: Any) -> bool:
    """Write ``value`` as JSON to ``path`` atomically (see :func:`write_atomic`)."""
    return write_atomic(path, json.dumps(value, sort_keys=True).encode())


def file_digest(path: str) -> str:
    """SHA-256 of a file's content (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parsed_arrays(root: str, name: str, source: str,
                  parse: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays ``parse()`` makes of the file ``source``, from ``<root>/parsed/`` when a
    copy made from the same content is there; else parsed now and stored there (``.npz``,
    no pickles) for the next process."""
    path = os.path.join(os.path.expanduser(root), PARSED_FOLDER,
                        f"{name}-{file_digest(source)[:32]}.npz")
    arrays = _read_npz(path)
    if arrays is not None:
        return arrays
    arrays = parse()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())
    return arrays


def _read_npz(path: str) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
