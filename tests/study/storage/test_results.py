"""Tests of the results store: schema, upsert, resume, atomic flush, URIs."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from study.storage.read import read_epochs, read_trials
from study.storage.schema import EPOCHS_SCHEMA, SCHEMA_VERSION, TRIALS_SCHEMA, package_version
from study.storage.store import ResultsStore

DOCS = Path(__file__).resolve().parents[3] / "docs" / "results-schema.md"


def trial(trial_id: str, **extra: object) -> dict:
    row = {"trial_id": trial_id, "status": "completed", "prune_rate": 0.5, "batch_size": 256,
           "epsilon_target": 3, "test_accuracy": 0.91, "pruning_criterion": "magnitude",
           "finished_at": dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)}
    row.update(extra)
    return row


def epochs(n: int, acc: float = 0.5) -> list[dict]:
    return [{"epoch": e, "test_accuracy": acc + 0.01 * e, "steps": 10 * e} for e in range(1, n + 1)]


@pytest.fixture()
def store(tmp_path: Path) -> ResultsStore:
    s = ResultsStore(str(tmp_path), "quick")
    s.add_trial(trial("a"), epochs(3))
    s.add_trial(trial("b", status="stopped", test_accuracy=0.4), epochs(1))
    s.flush()
    return s


def test_roundtrip_pyarrow_and_pandas(store: ResultsStore, tmp_path: Path) -> None:
    table = pq.read_table(tmp_path / "trials.parquet")
    assert table.column("trial_id").to_pylist() == ["a", "b"]
    assert table.column("study").to_pylist() == ["quick", "quick"]
    assert table.column("epsilon_target").to_pylist() == [3.0, 3.0]
    assert table.column("clip_norm").null_count == 2
    assert table.column("version").to_pylist()[0] == package_version()
    df = pd.read_parquet(tmp_path / "trials.parquet")
    assert list(df["status"]) == ["completed", "stopped"]
    assert df["finished_at"].iloc[0] == pd.Timestamp("2024-05-01T12:00:00Z")
    ep = pd.read_parquet(tmp_path / "epochs.parquet")
    assert len(ep) == 4
    assert list(ep.loc[ep.trial_id == "a", "epoch"]) == [1, 2, 3]


def test_schema_exact(store: ResultsStore, tmp_path: Path) -> None:
    for name, schema in (("trials", TRIALS_SCHEMA), ("epochs", EPOCHS_SCHEMA)):
        parts = sorted((tmp_path / f"{name}.parquet").glob("part-*.parquet"))
        assert len(parts) == 2  # one part per trial
        on_disk = pq.read_schema(parts[0])
        assert on_disk.names == schema.names
        assert on_disk.types == schema.types
        assert on_disk.metadata[b"dpstudy.schema_version"] == str(SCHEMA_VERSION).encode()
    assert TRIALS_SCHEMA.field("finished_at").type == pa.timestamp("us", tz="UTC")
    assert TRIALS_SCHEMA.field("batch_size").type == pa.int64()
    nonnull = [f.name for f in TRIALS_SCHEMA if not f.nullable]
    assert nonnull == ["study", "trial_id", "status"]
    assert all(f.metadata[b"doc"] for f in TRIALS_SCHEMA)
    assert store.trials().schema.equals(TRIALS_SCHEMA)
    assert store.epochs().schema.equals(EPOCHS_SCHEMA)


def test_docs_cover_every_column() -> None:
    text = DOCS.read_text()
    for name in {*TRIALS_SCHEMA.names, *EPOCHS_SCHEMA.names}:
        assert f"`{name}`" in text, name


def test_upsert_replaces_row_and_epochs(store: ResultsStore, tmp_path: Path) -> None:
    store.add_trial(trial("a", test_accuracy=0.99), epochs(2, acc=0.9))
    store.flush()
    table = read_trials(str(tmp_path))
    assert sorted(table.column("trial_id").to_pylist()) == ["a", "b"]
    row = table.filter(pa.compute.equal(table["trial_id"], "a")).to_pylist()[0]
    assert row["test_accuracy"] == 0.99
    ep = read_epochs(str(tmp_path)).to_pandas()
    assert list(ep.loc[ep.trial_id == "a", "epoch"]) == [1, 2]
    assert ep.loc[ep.trial_id == "a", "test_accuracy"].iloc[0] == pytest.approx(0.91)
    assert len(ep) == 3


def test_reopen_merges_without_duplicates(store: ResultsStore, tmp_path: Path) -> None:
    resumed = ResultsStore(str(tmp_path), "quick")
    assert resumed.trial_ids() == {"a", "b"}
    assert resumed.epochs().num_rows == 4
    resumed.add_trial(trial("b", test_accuracy=0.8), epochs(4))
    resumed.add_trial(trial("c"), epochs(1))
    resumed.flush()
    df = read_trials(str(tmp_path)).to_pandas()
    assert sorted(df.trial_id) == ["a", "b", "c"]
    assert df.set_index("trial_id").loc["b", "test_accuracy"] == 0.8
    ep = read_epochs(str(tmp_path)).to_pandas()
    assert not ep.duplicated(["study", "trial_id", "epoch"]).any()
    assert ep.groupby("trial_id").size().to_dict() == {"a": 3, "b": 4, "c": 1}


def test_unknown_key_and_bad_values(tmp_path: Path) -> None:
    s = ResultsStore(str(tmp_path), "quick")
    with pytest.raises(ValueError, match="accuracy.*prune"):
        s.add_trial(trial("a", accuracy=0.9, prune=0.1), [])
    with pytest.raises(ValueError, match="epoch row.*train_acc"):
        s.add_trial(trial("a"), [{"epoch": 1, "train_acc": 0.3}])
    with pytest.raises(ValueError, match="status"):
        s.add_trial(trial("a", status="running"), [])
    with pytest.raises(ValueError, match="batch_size"):
        s.add_trial(trial("a", batch_size=2.5), [])
    with pytest.raises(ValueError, match="status.*required"):
        s.add_trial({"trial_id": "x"}, [])
    with pytest.raises(ValueError, match="duplicate epoch"):
        s.add_trial(trial("a"), [{"epoch": 1}, {"epoch": 1}])
    assert s.trial_ids() == set()


def test_types_are_coerced(tmp_path: Path) -> None:
    s = ResultsStore(str(tmp_path), "quick")
    s.add_trial(trial(7, batch_size=64.0, clip_norm="1.5", seed=3,
                      finished_at="2024-05-01T12:00:00"), [{"epoch": 1.0, "steps": 5.0}])
    row = s.trials().to_pylist()[0]
    assert row["trial_id"] == "7" and row["batch_size"] == 64 and row["clip_norm"] == 1.5
    assert row["finished_at"] == dt.datetime(2024, 5, 1, 12, tzinfo=dt.timezone.utc)
    assert s.epochs().to_pylist()[0]["steps"] == 5


def test_leftover_staged_files_are_removed(store: ResultsStore, tmp_path: Path) -> None:
    staging = tmp_path / "trials.parquet" / ".staging-quick"
    staging.mkdir(exist_ok=True)
    leftover = staging / "part-x.parquet"
    leftover.write_bytes(b"PAR1 partial garbage")
    other = tmp_path / "trials.parquet" / ".staging-other"  # another study's, in flight
    other.mkdir()
    (other / "part-y.parquet").write_bytes(b"PAR1 being written")
    resumed = ResultsStore(str(tmp_path), "quick")
    assert not leftover.exists() and (other / "part-y.parquet").exists()
    assert resumed.trial_ids() == {"a", "b"}
    assert len(read_trials(str(tmp_path))) == 2
    assert len(pd.read_parquet(tmp_path / "trials.parquet")) == 2  # hidden dirs ignored


def test_failed_flush_keeps_previous_parts(store: ResultsStore, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    before = sorted(p.name for p in (tmp_path / "trials.parquet").iterdir())
    real_write = pq.write_table

    def broken_write(table: pa.Table, where: str, **kwargs: object) -> None:
        if "trials" in where:
            Path(where).write_bytes(b"PAR1 half a file")
            raise OSError("disk full")
        real_write(table, where, **kwargs)

    monkeypatch.setattr("study.storage.store.pq.write_table", broken_write)
    store.add_trial(trial("a", test_accuracy=0.1), epochs(2))
    with pytest.raises(OSError, match="disk full"):
        store.flush()
    assert sorted(p.name for p in (tmp_path / "trials.parquet").iterdir()) == before
    assert sorted(pd.read_parquet(tmp_path / "trials.parquet").trial_id) == ["a", "b"]
    assert read_trials(str(tmp_path)).to_pandas().set_index("trial_id").loc[
        "a", "test_accuracy"] == 0.91
    assert read_epochs(str(tmp_path)).num_rows == 4


def test_superseded_parts_are_deleted_and_never_win(store: ResultsStore, tmp_path: Path) -> None:
    store.add_trial(trial("a", test_accuracy=0.2), epochs(2, acc=0.1))
    store.flush()
    parts = sorted((tmp_path / "trials.parquet").glob("part-*.parquet"))
    assert len(parts) == 2  # a's old part is gone
    df = pd.read_parquet(tmp_path / "trials.parquet")
    assert not df.duplicated(["study", "trial_id"]).any()
    # a reader that runs between publish and delete still sees a's newest row only
    old = tmp_path / "trials.parquet" / "part-00000000T000000000000Z-000000000000.parquet"
    pq.write_table(pa.Table.from_pylist([{**trial("a"), "study": "quick"}]), old)
    got = read_trials(str(tmp_path)).to_pandas().set_index("trial_id")
    assert got.loc["a", "test_accuracy"] == 0.2 and len(got) == 2
    ep = read_epochs(str(tmp_path)).to_pandas()
    assert list(ep.loc[ep.trial_id == "a", "epoch"]) == [1, 2]


def test_foreign_parquet_files_are_named(tmp_path: Path) -> None:
    wrong_type = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"study": ["s"], "trial_id": ["t"], "status": ["completed"],
                             "prune_rate": ["high"]}), wrong_type)
    with pytest.raises(ValueError, match=r"wrong.parquet: column 'prune_rate' must be double"):
        read_trials(str(wrong_type))
    no_status = tmp_path / "nostatus.parquet"
    pq.write_table(pa.table({"study": ["s"], "trial_id": ["t"]}), no_status)
    with pytest.raises(ValueError, match=r"nostatus.parquet: required column\(s\) \['status'\]"):
        read_trials(str(no_status))


def test_file_uri_and_plain_path(tmp_path: Path) -> None:
    uri = (tmp_path / "sub" / "dir").as_uri()
    s = ResultsStore(uri, "quick")
    s.add_trial(trial("a"), epochs(2))
    s.flush()
    assert read_trials(str(tmp_path / "sub" / "dir")).num_rows == 1
    assert read_trials(uri + "/trials.parquet").num_rows == 1
    assert read_epochs(uri).num_rows == 2
    assert ResultsStore(str(tmp_path / "sub" / "dir"), "quick").trial_ids() == {"a"}


def test_tilde_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    s = ResultsStore("~/res", "quick")
    s.add_trial(trial("a"), [])
    s.flush()
    assert (tmp_path / "res" / "trials.parquet").exists()


def test_missing_results_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no results table"):
        read_trials(str(tmp_path))


def test_other_studies_in_same_dir_are_kept(store: ResultsStore, tmp_path: Path) -> None:
    other = ResultsStore(str(tmp_path), "other")
    assert other.trial_ids() == set() and other.trials().num_rows == 0
    other.add_trial(trial("a"), epochs(1))
    other.flush()
    df = read_trials(str(tmp_path)).to_pandas()
    keys = sorted(zip(df.study, df.trial_id, strict=True))
    assert keys == [("other", "a"), ("quick", "a"), ("quick", "b")]
    with pytest.raises(ValueError, match="study"):
        other.add_trial(trial("z", study="quick"), [])


def test_flush_writes_only_the_new_trial(tmp_path: Path) -> None:
    s = ResultsStore(str(tmp_path), "big")
    for i in range(300):
        s.add_trial(trial(f"t{i:04d}", seed=i), epochs(5))
    s.flush()
    assert read_trials(str(tmp_path)).num_rows == 300
    assert read_epochs(str(tmp_path)).num_rows == 1500
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "trials.parquet").iterdir()
              if p.is_file()}
    s.add_trial(trial("t9999"), epochs(1))
    s.flush()  # per-completion flush cost does not grow with the study: one new part
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "trials.parquet").iterdir()
             if p.is_file()}
    assert len(set(after) - set(before)) == 1 and all(after[k] == v for k, v in before.items())


def test_duckdb_reads_the_files(store: ResultsStore, tmp_path: Path) -> None:
    import duckdb

    path = str(tmp_path / "trials.parquet")
    count = duckdb.sql(f"SELECT count(*) FROM '{path}/*.parquet' "
                       f"WHERE status = 'completed'").fetchall()
    assert count == [(1,)]
    # the documented de-duplicating query, with a superseded part present
    old = tmp_path / "trials.parquet" / "part-00000000T000000000000Z-000000000000.parquet"
    pq.write_table(pa.Table.from_pylist([{**trial("a", test_accuracy=0.0), "study": "quick"}]),
                   old)
    rows = duckdb.sql(f"""
        SELECT trial_id, test_accuracy FROM read_parquet('{path}/*.parquet', filename = true)
        QUALIFY row_number() OVER (PARTITION BY study, trial_id ORDER BY filename DESC) = 1
        ORDER BY trial_id""").fetchall()
    assert rows == [("a", 0.91), ("b", 0.4)]


def test_polars_reads_the_files(store: ResultsStore, tmp_path: Path) -> None:
    import polars as pl

    assert pl.read_parquet(str(tmp_path / "trials.parquet" / "*.parquet")).height == 2
    assert pl.read_parquet(str(tmp_path / "epochs.parquet" / "*.parquet")).height == 4
    assert pl.read_parquet(str(tmp_path / "trials.parquet")).height == 2  # a directory too


WRITER = """
import sys
from study.storage.store import ResultsStore
store = ResultsStore(sys.argv[1], sys.argv[2])
for i in range(int(sys.argv[3])):
    store.add_trial({"trial_id": f"t{i}", "status": "completed", "test_accuracy": i / 100},
                    [{"epoch": 1}, {"epoch": 2}])
    store.flush()
"""


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_studies_sharing_a_results_root_lose_nothing(where: str, tmp_path: Path,
                                                                 request) -> None:
    import os
    import subprocess
    import sys

    from study.storage.locations import join_location

    root = Path(__file__).resolve().parents[3]
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_root")
    uri = join_location(base, "shared")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, name, "25"], cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root)},
                              stderr=subprocess.PIPE, text=True)
             for name in ("one", "two", "three")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
    df = read_trials(uri).to_pandas()
    assert len(df) == 75 and not df.duplicated(["study", "trial_id"]).any()
    assert df.groupby("study").size().to_dict() == {"one": 25, "three": 25, "two": 25}
    assert read_epochs(uri).num_rows == 150
    for name in ("one", "two", "three"):  # each study's own view, as its resume sees it
        assert len(ResultsStore(uri, name).trial_ids()) == 25


def test_reproducible_noise_column_is_a_strict_bool(tmp_path: Path) -> None:
    s = ResultsStore(str(tmp_path), "flags")
    s.add_trial(trial("secret", reproducible_noise=False), [])
    s.add_trial(trial("seeded", reproducible_noise=True), [])
    s.add_trial(trial("unknown"), [])
    s.flush()
    table = read_trials(str(tmp_path))
    assert table.schema.field("reproducible_noise").type == pa.bool_()
    flags = dict(zip(table["trial_id"].to_pylist(), table["reproducible_noise"].to_pylist(),
                     strict=True))
    assert flags == {"secret": False, "seeded": True, "unknown": None}
    with pytest.raises(ValueError, match="reproducible_noise"):
        s.add_trial(trial("bad", reproducible_noise="yes"), [])
