"""Hostile input to ``dpstudy``: one clear line, non-zero exit, nothing left behind, and
refused before anything heavy (Ray, torch, training) starts."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from study.cli import main
from study.storage.locations import LocationError, check_writable, join_location
from study.storage.store import ResultsStore

ROOT = Path(__file__).resolve().parents[3]

GOOD: dict[str, Any] = {
    "name": "hostile", "dataset": {"name": "mnist-5k"}, "model": {"name": "cnn-mnist"},
    "privacy": {"epsilon": 3.0, "delta": 1e-5},
    "search": {"clip_norm": 1.0, "noise_multiplier": {"low": 0.5, "high": 2.0},
               "learning_rate": 1.0, "batch_size": 256, "max_epochs": 1},
    "trials": 2,
}

ALIAS_BOMB = """\
a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
name: [*g,*g,*g,*g,*g,*g,*g,*g,*g]
"""


def write_spec(tmp_path: Path, **changes: Any) -> Path:
    spec = copy.deepcopy(GOOD)
    spec["storage"] = str(tmp_path / "runs")
    spec["results"] = str(tmp_path / "results")
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def refused(argv: list[str], capsys: pytest.CaptureFixture, code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_yaml_alias_bomb_is_refused_at_once(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    started = time.perf_counter()
    err = refused(["run", str(path)], capsys)
    assert time.perf_counter() - started < 5  # (the expanded tree would be 9**8 items)
    assert str(path) in err and "anchors and aliases" in err and "line 1" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]


def test_non_utf8_spec_names_the_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    err = refused(["run", str(path)], capsys)
    assert str(path) in err and "UTF-8" in err


@pytest.mark.parametrize("epsilon", [1000, 1e308, 1e-6])
def test_epsilon_outside_the_accountants_range(epsilon: float, tmp_path: Path, capsys) -> None:
    path = write_spec(tmp_path, privacy={"epsilon": epsilon, "delta": 1e-5})
    started = time.perf_counter()
    err = refused(["run", str(path)], capsys)
    assert time.perf_counter() - started < 5
    assert "privacy.epsilon" in err and "[0.1, 20]" in err and repr(epsilon) in err


def test_rdp_budget_too_low_names_the_field(tmp_path: Path, capsys) -> None:
    path = write_spec(tmp_path, privacy={"epsilon": 0.1, "delta": 1e-5, "accountant": "rdp"})
    err = refused(["run", str(path)], capsys)
    assert "privacy.epsilon" in err and "rdp" in err and "0.1" in err


def unwritable_cases(tmp_path: Path) -> dict[str, str]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    return {"under /proc": "/proc/dpstudy-results", "a regular file": str(a_file),
            "a file's child": str(a_file / "child")}


@pytest.mark.parametrize("field", ["results", "storage"])
@pytest.mark.parametrize("case", ["under /proc", "a regular file", "a file's child"])
def test_unwritable_location_refused_before_any_trial(field: str, case: str, tmp_path: Path,
                                                      capsys) -> None:
    location = unwritable_cases(tmp_path)[case]
    path = write_spec(tmp_path, **{field: location})
    if field == "storage":
        path = write_spec(tmp_path, storage=location, results=str(tmp_path / "results"))
    err = refused(["run", str(path)], capsys)
    assert f"{field}:" in err and location.split("/child")[0] in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "spec.yaml"]


def test_hdfs_storage_without_hadoop_is_one_line(tmp_path: Path) -> None:
    path = write_spec(tmp_path, storage="hdfs://namenode:8020/runs")
    probe = ("import sys; from study.cli import main; rc = main(['run', sys.argv[1]]);"
             " sys.exit(rc if 'ray' not in sys.modules else 99)")  # refused before Ray
    done = subprocess.run([sys.executable, "-c", probe, str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: storage: cannot open 'hdfs://namenode:8020/runs': Unable to load libjvm"]


def test_unanswering_object_store_times_out_with_the_field() -> None:
    with pytest.raises(LocationError, match=r"results: no answer from 's3://b/r\?endpoint"):
        check_writable("s3://b/r?endpoint_override=127.0.0.1:9&scheme=http", "results",
                       timeout_s=1.0)


def test_write_check_keeps_what_another_study_wrote_meanwhile(tmp_path: Path,
                                                                monkeypatch) -> None:
    """Two studies check one new results root at once: the check that created the directory
    removes it only if it is empty, never another study's files (CI once lost a probe)."""
    import study.storage.locations as paths

    shared = tmp_path / "shared" / "deeper"
    real_filesystem = paths.filesystem

    class OtherStudyWritesMeanwhile:  # between the probe's write and its clean-up
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def delete_file(self, path):
            (shared / "other-study-part.parquet").write_bytes(b"rows")
            self.fs.delete_file(path)

    def racing_filesystem(location, field):
        fs, path = real_filesystem(location, field)
        return OtherStudyWritesMeanwhile(fs), path

    monkeypatch.setattr(paths, "filesystem", racing_filesystem)
    paths.check_writable(str(shared), "results")
    assert [p.name for p in shared.iterdir()] == ["other-study-part.parquet"]

    monkeypatch.setattr(paths, "filesystem", real_filesystem)
    fresh = tmp_path / "fresh" / "root"
    paths.check_writable(str(fresh), "results")
    assert not (tmp_path / "fresh").exists()  # the directories it made are gone again


def test_query_parameters_stay_after_the_joined_path() -> None:
    base = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_location(base, "quick") == \
        "s3://bucket/runs/quick?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_location("gs://b", "x", "y") == "gs://b/x/y"


def test_experiment_dir_with_query_storage() -> None:
    from study.spec.model import StudySpec
    from study.storage import experiment

    spec = StudySpec.from_dict({**GOOD, "storage": "s3://b/runs?endpoint_override=h:1",
                                "results": "s3://b/res?endpoint_override=h:1"})
    assert experiment.experiment_dir(spec) == "s3://b/runs/hostile?endpoint_override=h:1"


def test_relative_locations_are_stored_absolute(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from study.execution import runner
    from study.storage import experiment

    monkeypatch.chdir(tmp_path)
    spec_path = tmp_path / "rel.yaml"
    spec_path.write_text(yaml.safe_dump({**GOOD, "storage": "runs", "results": "out/r"}))
    spec, _ = runner.prepare(str(spec_path))
    assert spec.storage == str(tmp_path / "runs") and spec.results == str(tmp_path / "out/r")
    experiment.save_spec(spec, str(tmp_path / "exp"))
    monkeypatch.chdir("/")
    again = experiment.read_spec(str(tmp_path / "exp"))
    assert again.results_path == str(tmp_path / "out/r")  # whoever resumes, from wherever
    assert runner.resolve_paths(again) == again


def test_rejected_run_imports_neither_ray_nor_torch(tmp_path: Path) -> None:
    path = write_spec(tmp_path, trials=0)
    probe = ("import sys; from study.cli import main; rc = main(['run', sys.argv[1]]);"
             " hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')];"
             " print(rc, 'ray' in sys.modules, 'torch' in sys.modules,"
             " int(hwm[0].split()[1]) // 1024)")
    done = subprocess.run([sys.executable, "-c", probe, str(path)], cwd=ROOT, timeout=120,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    rc, ray, torch, peak_mib = done.stdout.split()
    assert (rc, ray, torch) == ("2", "False", "False"), done.stderr[-2000:]
    assert int(peak_mib) < 200  # peak resident memory (was about 1 GB with Ray and torch)
    assert "trials: must be >= 1" in done.stderr


@pytest.fixture()
def fixture_results(tmp_path: Path) -> Path:
    store = ResultsStore(str(tmp_path / "res"), "fix")
    for i in range(3):
        store.add_trial({"trial_id": f"t{i}", "status": "completed", "test_accuracy": i / 10},
                        [])
    store.flush()
    return tmp_path / "res"


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_query_limit_must_be_positive(limit: str, fixture_results: Path, capsys) -> None:
    err = refused(["query", str(fixture_results), "--limit", limit], capsys)
    assert f"--limit: must be a positive number of rows (got {limit})" in err


def test_query_limit_keeps_that_many_rows(fixture_results: Path, capsys) -> None:
    assert main(["query", str(fixture_results), "--limit", "2", "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # header + 2


def test_report_out_existing_file(fixture_results: Path, tmp_path: Path, capsys) -> None:
    existing = tmp_path / "report.html"
    existing.write_text("keep me")
    err = refused(["report", str(fixture_results), "--out", str(existing)], capsys)
    assert "--out" in err and str(existing) in err and existing.read_text() == "keep me"


def test_foreign_parquet_is_named(tmp_path: Path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"study": ["s"], "trial_id": ["t"], "status": ["completed"],
                             "epsilon_spent": ["a lot"]}), path)
    err = refused(["query", str(path)], capsys)
    assert str(path) in err and "'epsilon_spent' must be double" in err
    pq.write_table(pa.table({"trial_id": ["t"], "test_accuracy": [0.5]}), path)
    err = refused(["query", str(path)], capsys)
    assert str(path) in err and "['study', 'status']" in err
