"""Tests of the results store: schema, upsert, resume, atomic flush, URIs."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from study import results
from study.results import (
    EPOCHS_SCHEMA,
    SCHEMA_VERSION,
    TRIALS_SCHEMA,
    ResultsStore,
    read_epochs,
    read_trials,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "results-schema.md"


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
    assert table.column("version").to_pylist()[0] == results.package_version()
    df = pd.read_parquet(tmp_path / "trials.parquet")
    assert list(df["status"]) == ["completed", "stopped"]
    assert df["finished_at"].iloc[0] == pd.Timestamp("2024-05-01T12:00:00Z")
    ep = pd.read_parquet(tmp_path / "epochs.parquet")
    assert len(ep) == 4
    assert list(ep.loc[ep.trial_id == "a", "epoch"]) == [1, 2, 3]


def test_schema_exact(store: ResultsStore, tmp_path: Path) -> None:
    for name, schema in (("trials", TRIALS_SCHEMA), ("epochs", EPOCHS_SCHEMA)):
        on_disk = pq.read_schema(tmp_path / f"{name}.parquet")
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


def test_leftover_tmp_files_are_removed(store: ResultsStore, tmp_path: Path) -> None:
    leftover = tmp_path / "trials.parquet.tmp-deadbeef"
    leftover.write_bytes(b"PAR1 partial garbage")
    resumed = ResultsStore(str(tmp_path), "quick")
    assert not leftover.exists()
    assert resumed.trial_ids() == {"a", "b"}
    assert len(read_trials(str(tmp_path))) == 2


def test_failed_flush_keeps_previous_file(store: ResultsStore, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    before = (tmp_path / "trials.parquet").read_bytes()
    real_write = pq.write_table

    def broken_write(table: pa.Table, where: str, **kwargs: object) -> None:
        if "trials" in where:
            Path(where).write_bytes(b"PAR1 half a file")
            raise OSError("disk full")
        real_write(table, where, **kwargs)

    monkeypatch.setattr(results.pq, "write_table", broken_write)
    store.add_trial(trial("c"), epochs(2))
    with pytest.raises(OSError, match="disk full"):
        store.flush()
    assert (tmp_path / "trials.parquet").read_bytes() == before
    assert sorted(pd.read_parquet(tmp_path / "trials.parquet").trial_id) == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epochs.parquet", "trials.parquet"]
    assert read_epochs(str(tmp_path)).num_rows == 4


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


def test_flush_1000_trials_is_fast(tmp_path: Path) -> None:
    s = ResultsStore(str(tmp_path), "big")
    for i in range(1000):
        s.add_trial(trial(f"t{i:04d}", seed=i), epochs(5))
    start = time.perf_counter()
    s.flush()
    assert time.perf_counter() - start < 1.0
    assert read_trials(str(tmp_path)).num_rows == 1000
    assert read_epochs(str(tmp_path)).num_rows == 5000


def test_duckdb_reads_the_files(store: ResultsStore, tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    path = str(tmp_path / "trials.parquet")
    count = duckdb.sql(f"SELECT count(*) FROM '{path}' WHERE status = 'completed'").fetchone()
    assert count == (1,)


def test_polars_reads_the_files(store: ResultsStore, tmp_path: Path) -> None:
    pl = pytest.importorskip("polars")
    assert pl.read_parquet(str(tmp_path / "trials.parquet")).height == 2
    assert pl.read_parquet(str(tmp_path / "epochs.parquet")).height == 4


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
