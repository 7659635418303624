"""The experiment directory's saved spec (``STORAGE/NAME/dpstudy-spec.yaml``, which ``resume``
reads) and its copy in the results directory (which ``dpstudy confirm RESULTS`` reads)."""

from __future__ import annotations

import posixpath

import pyarrow.fs as pafs
import yaml

from study.spec.model import SpecError, StudySpec
from study.storage.locations import LocationError, filesystem, join_location
from trainables.config import load_yaml

SPEC_FILE = "dpstudy-spec.yaml"


def experiment_dir(spec: StudySpec) -> str:
    """``storage/NAME`` (a local path or a URI; joined before any query string)."""
    return join_location(spec.storage_path, spec.name)


def exists(path: str) -> bool:
    """Whether ``path`` (a local path or a URI) exists, as a file or a directory."""
    fs, where = filesystem(path, "storage")
    return fs.get_file_info(where).type != pafs.FileType.NotFound


def save_spec(spec: StudySpec, directory: str, name: str = SPEC_FILE) -> None:
    """Write the resolved spec next to Tune's experiment state (or, named after the study,
    into its results directory, where ``dpstudy confirm RESULTS`` finds it)."""
    fs, where = filesystem(directory, "storage")
    fs.create_dir(where, recursive=True)
    with fs.open_output_stream(posixpath.join(where, name)) as out:
        out.write(yaml.safe_dump(spec.to_dict(), sort_keys=False).encode())


def results_spec_name(study: str) -> str:
    """File name of a study's spec copy in its results directory."""
    return f"{study}.{SPEC_FILE}"


def is_experiment_dir(location: str) -> bool:
    """Whether ``location`` is an experiment directory (holds the saved spec)."""
    fs, where = filesystem(location, "storage")
    return fs.get_file_info(posixpath.join(where, SPEC_FILE)).type == pafs.FileType.File


def find_spec(location: str, study: str | None = None) -> StudySpec:
    """The spec of a study from its experiment directory (``STORAGE/NAME``) or its results
    directory (``study`` picks one when several studies share it)."""
    if is_experiment_dir(location):
        return read_spec(location)
    fs, where = filesystem(location, "storage")
    suffix = "." + SPEC_FILE
    infos = fs.get_file_info(pafs.FileSelector(where, allow_not_found=True))
    names = sorted(i.base_name.removesuffix(suffix) for i in infos
                   if i.base_name.endswith(suffix))
    if study is not None and study not in names:
        raise SpecError([f"study: no spec of study {study!r} in {location!r} (found: "
                         f"{', '.join(names) or 'none'})"])
    if study is None and len(names) != 1:
        found = "no study spec" if not names else f"several studies ({', '.join(names)}); " \
            "pass --study"
        raise SpecError([f"results: {location!r} holds {found} (got {location!r})"])
    with fs.open_input_stream(posixpath.join(where, results_spec_name(study or names[0]))) as f:
        return StudySpec.from_dict(yaml.safe_load(f.read().decode()))


def read_spec(directory: str) -> StudySpec:
    """The spec saved by :func:`save_spec` in an experiment directory."""
    try:
        fs, where = filesystem(directory, "storage")
    except LocationError as err:
        raise SpecError([f"resume: {err}"]) from None
    path = posixpath.join(where, SPEC_FILE)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise SpecError([f"resume: {directory!r} is not a dpstudy experiment directory "
                         f"(no {SPEC_FILE})"])
    with fs.open_input_stream(path) as f:
        return StudySpec.from_dict(load_yaml(f.read().decode(), path))
