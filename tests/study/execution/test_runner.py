"""End to end through the CLI on an embedded Ray: run, report, kill -9 and resume. The
killed driver is a real process; the other commands run in this process
(``tests/inprocess.py``), on the embedded Ray the tests share."""

from __future__ import annotations

import glob
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from inprocess import dpstudy
from optuna.trial import TrialState

from study.search.persisted import load_study
from study.search.space import TUNE_TRIAL_ID

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n"
KILLED_TRIALS = 4  # the driver is killed once the first is recorded: 3 left to resume


def write_spec(tmp_path: Path, name: str, **overrides: Any) -> Path:
    spec: dict[str, Any] = {
        "name": name, "seed": 0,
        "dataset": {"name": "mnist-5k"}, "model": {"name": "cnn-mnist"}, "device": "cpu",
        "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"},
        "pruning": {"criterion": "random"}, "dropping": {"criterion": "random"},
        "search": {"prune_rate": {"low": 0.0, "high": 0.8},
                   "drop_rate": {"low": 0.0, "high": 0.8},
                   "clip_norm": {"low": 0.5, "high": 2.0, "log": True},
                   "noise_multiplier": {"low": 1.0, "high": 2.0},
                   "learning_rate": {"low": 0.5, "high": 3.0, "log": True},
                   "batch_size": 500, "max_epochs": 2},
        "trials": 4, "max_concurrent": 2, "resources_per_trial": {"cpu": 1, "gpu": 0},
        "objective": {"metrics": ["val_accuracy"], "modes": ["max"]},
        "sampler": "tpe", "scheduler": "none",
        "storage": str(tmp_path / "runs"), "results": str(tmp_path / "results" / name),
    }
    spec.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trials_table(results: Path) -> list[dict[str, Any]]:
    return pq.read_table(results / "trials.parquet").to_pylist()


def test_four_trial_study_end_to_end(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "e2e", scheduler={"name": "asha", "grace_budget": 0.5})
    done = dpstudy("run", str(spec))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[e2e] 4/4 done" in done.stdout

    results = tmp_path / "results" / "e2e"
    rows = trials_table(results)
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4
    assert {r["status"] for r in rows} <= {"completed", "stopped"}
    assert any(r["status"] == "completed" for r in rows)
    for row in rows:
        assert row["epsilon_spent"] <= row["epsilon_target"] == 3.0
        assert 0.0 <= row["prune_rate"] <= 0.8 and row["node"] == "127.0.0.1"
        assert row["stage"] == "search" and row["selection_split"] == "validation"
        if row["status"] == "completed":  # budget-exact: every completed trial spends it
            assert 0.97 <= row["budget_used"] <= 1.0, row
    assert any(r["prune_rate"] == 0.0 and r["drop_rate"] == 0.0 for r in rows)  # baseline
    epochs = pq.read_table(results / "epochs.parquet").to_pylist()
    for row in rows:
        mine = [e for e in epochs if e["trial_id"] == row["trial_id"]]
        assert [e["epoch"] for e in mine] == list(range(1, len(mine) + 1))
        assert mine[-1]["test_accuracy"] == row["test_accuracy"]
    assert max(r["test_accuracy"] for r in rows) > 0.3

    report = dpstudy("report", str(results), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr[-3000:]
    pngs = glob.glob(str(tmp_path / "report" / "*.png"))
    assert len(pngs) >= 4
    for png in pngs:
        assert Path(png).read_bytes()[:8] == PNG
    assert (tmp_path / "report" / "report.html").exists()

    again = dpstudy("run", str(spec))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_kill_driver_then_resume_loses_and_repeats_nothing(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "killed", trials=KILLED_TRIALS)
    results = tmp_path / "results" / "killed"
    driver = subprocess.Popen([sys.executable, "-m", "study.cli", "run", str(spec)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if (results / "trials.parquet").exists() and len(trials_table(results)) >= 1:
                break
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            time.sleep(0.5)
        before = trials_table(results)
        assert 1 <= len(before) < KILLED_TRIALS
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=120)
    finally:
        _kill_group(driver.pid)

    resumed = dpstudy("resume", str(tmp_path / "runs" / "killed"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    rows = trials_table(results)
    ids = [r["trial_id"] for r in rows]
    assert len(ids) == KILLED_TRIALS and len(set(ids)) == KILLED_TRIALS
    assert {r["trial_id"] for r in before} <= set(ids)
    assert all(r["status"] == "completed" for r in rows)
    assert all(r["epsilon_spent"] <= 3.0 for r in rows)
    epochs = pq.read_table(results / "epochs.parquet").to_pylist()
    keys = [(e["trial_id"], e["epoch"]) for e in epochs]
    assert len(keys) == len(set(keys))
    assert len({k[0] for k in keys}) == KILLED_TRIALS

    state = sorted(glob.glob(str(tmp_path / "runs" / "killed" / "searcher-state-*.pkl")))[-1]
    with open(state, "rb") as f:
        searcher = pickle.load(f)
    study = searcher["searcher"]._ot_study if "searcher" in searcher else searcher["_ot_study"]
    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(finished) == KILLED_TRIALS
    journal = load_study(str(tmp_path / "runs" / "killed"), "killed")  # Optuna's own storage
    done = [t.user_attrs[TUNE_TRIAL_ID] for t in journal.trials
            if t.state == TrialState.COMPLETE]
    assert sorted(done) == sorted(ids)  # every finished trial exactly once
    assert not [t for t in journal.trials if t.state == TrialState.RUNNING]


def _kill_group(pid: int) -> None:
    """Clean up whatever the killed driver left in its own process group."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
