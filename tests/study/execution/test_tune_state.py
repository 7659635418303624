"""A state file truncated by a killed driver is put back from the driver's staged copy
before a resume, or the resume is refused; it never silently starts the study over."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from study.execution.tune_state import DamagedStateError, newest_session_files, repair

SESSION = "2026-11-24_00-05-38"
STATE = f"experiment_state-{SESSION}.json"
SEARCHER = f"searcher-state-{SESSION}.pkl"
GEN = f"search_gen_state-{SESSION}.json"


def experiment(tmp_path: Path, name: str = "killed") -> Path:
    directory = tmp_path / "runs" / name
    directory.mkdir(parents=True)
    (directory / STATE).write_text(json.dumps({"trial_data": [["t1", "m1"], ["t2", "m2"]]}))
    (directory / SEARCHER).write_bytes(pickle.dumps({"trials": 2}))
    (directory / GEN).write_text(json.dumps({"counter": 2}))
    return directory


def staged(temp_root: Path, name: str, file_name: str, data: bytes, run: str = "2026") -> Path:
    folder = temp_root / "session_1" / "artifacts" / run / name / "driver_artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file_name).write_bytes(data)
    return folder / file_name


def test_a_truncated_state_is_put_back_from_the_staged_copy(tmp_path: Path) -> None:
    directory = experiment(tmp_path)
    intact = (directory / STATE).read_bytes()
    staged(tmp_path / "ray", "killed", STATE, intact)
    (directory / STATE).write_bytes(intact[:40])  # killed mid-copy
    (directory / SEARCHER).write_bytes(b"")
    staged(tmp_path / "ray", "killed", SEARCHER, pickle.dumps({"trials": 2}))

    repaired = repair(pafs.LocalFileSystem(), str(directory), temp_root=str(tmp_path / "ray"))

    assert repaired == [STATE, SEARCHER]
    assert (directory / STATE).read_bytes() == intact
    assert pickle.loads((directory / SEARCHER).read_bytes()) == {"trials": 2}
    assert not list(directory.glob("*.tmp"))  # written beside, then renamed


def test_an_intact_state_is_left_alone(tmp_path: Path) -> None:
    directory = experiment(tmp_path)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    staged(tmp_path / "ray", "killed", STATE, b'{"trial_data": []}')  # must not be used
    assert repair(pafs.LocalFileSystem(), str(directory), temp_root=str(tmp_path / "ray")) == []
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_no_intact_copy_refuses_the_resume_naming_the_file(tmp_path: Path) -> None:
    directory = experiment(tmp_path)
    (directory / STATE).write_bytes(b"")
    staged(tmp_path / "ray", "killed", STATE, b"{trunc")  # the staged copy is damaged too
    staged(tmp_path / "ray", "other-study", STATE, b'{"trial_data": []}')  # not this study
    with pytest.raises(DamagedStateError, match=f"{STATE} is damaged.*lose finished trials"):
        repair(pafs.LocalFileSystem(), str(directory), temp_root=str(tmp_path / "ray"))
    assert (directory / STATE).read_bytes() == b""


def test_the_newest_intact_staged_copy_wins(tmp_path: Path) -> None:
    import os

    directory = experiment(tmp_path)
    (directory / STATE).write_bytes(b"")
    old = staged(tmp_path / "ray", "killed", STATE, b'{"trial_data": [["old", 1]]}', run="a")
    new = staged(tmp_path / "ray", "killed", STATE, b'{"trial_data": [["new", 1]]}', run="b")
    os.utime(old, (1, 1))
    os.utime(new, (2, 2))
    repair(pafs.LocalFileSystem(), str(directory), temp_root=str(tmp_path / "ray"))
    assert json.loads((directory / STATE).read_text())["trial_data"] == [["new", 1]]


def test_only_the_newest_session_is_checked() -> None:
    names = ["experiment_state-2026-01-01_00-00-00.json", "searcher-state-2026-01-01_00-00-00.pkl",
             STATE, SEARCHER, GEN, "tuner.pkl", "dpstudy-spec.yaml"]
    assert newest_session_files(names) == [STATE, GEN, SEARCHER]
    assert newest_session_files(["tuner.pkl"]) == []


def test_backup_copies_the_staged_set_and_repair_prefers_it(tmp_path: Path) -> None:
    """Both copies can be cut short (Tune rewrites the staged files while a background
    thread still copies the previous ones): the backup taken inside Tune's snapshot is
    put back, as a whole set."""
    from study.execution.tune_state import BACKUP_DIR, StateBackup

    directory = experiment(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    for p in directory.iterdir():
        (staging / p.name).write_bytes(p.read_bytes())
    backup = StateBackup(str(staging), pafs.LocalFileSystem(), str(directory))
    assert backup.save() is True
    assert backup.save() is False  # unchanged state: nothing written
    saved = {p.name: p.read_bytes() for p in (directory / BACKUP_DIR).iterdir()}
    assert sorted(saved) == sorted([STATE, SEARCHER, GEN])

    (directory / STATE).write_bytes(b"")  # killed mid-copy...
    (staging / STATE).write_bytes(b'{"trial_d')  # ...while the next snapshot was written
    (directory / GEN).write_bytes(b"\x80\x04")  # a pickle cut short
    repaired = repair(pafs.LocalFileSystem(), str(directory), temp_root=str(tmp_path / "ray"))
    assert sorted(repaired) == sorted([STATE, SEARCHER, GEN])
    assert {n: (directory / n).read_bytes() for n in saved} == saved


def test_a_pickled_json_state_file_counts_as_intact() -> None:
    from study.execution.tune_state import loads

    assert loads(pickle.dumps({"counter": 3}))  # Tune pickles search_gen_state
    assert loads(b'{"trial_data": []}')
    assert not loads(pickle.dumps({"counter": 3})[:-3])
    assert not loads(b"")


def test_an_intact_but_older_state_gives_way_to_a_newer_backup(tmp_path: Path) -> None:
    """Killed after a snapshot was backed up but before Tune's background copy carried it
    (the copy before it still running): the experiment directory holds an older state,
    intact, in which a finished trial still runs. The newer backup is put back, as a set;
    an older backup never replaces a newer state."""
    from study.execution.tune_state import BACKUP_DIR, StateBackup

    def snapshot(folder: Path, iteration: int, status: str) -> dict[str, bytes]:
        files = {STATE: json.dumps({"trial_data": [["t1", status]],
                                    "runner_data": {"_iteration": iteration}}).encode(),
                 SEARCHER: pickle.dumps({"told": iteration}),
                 GEN: json.dumps({"counter": 1}).encode()}
        for name, data in files.items():
            (folder / name).write_bytes(data)
        return files

    directory = experiment(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    fs = pafs.LocalFileSystem()
    snapshot(directory, 41, "RUNNING")  # the last copy that reached the directory
    newer = snapshot(staging, 42, "TERMINATED")  # the next snapshot, backed up, not copied
    assert StateBackup(str(staging), fs, str(directory)).save() is True
    assert sorted(repair(fs, str(directory))) == sorted(newer)
    assert {n: (directory / n).read_bytes() for n in newer} == newer

    later = snapshot(directory, 50, "TERMINATED")  # copies went on after the last backup
    assert repair(fs, str(directory)) == []
    assert {n: (directory / n).read_bytes() for n in later} == later
    (directory / BACKUP_DIR / STATE).write_bytes(b'{"runner_data": {"_iteration": 99')
    assert repair(fs, str(directory)) == []  # a cut-short backup is not newer: ignored
