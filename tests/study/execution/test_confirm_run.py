"""``dpstudy confirm`` end to end on an embedded Ray: K x S runs recorded once each, also
when the driver is killed with SIGKILL mid-confirmation and the command is run again. The
killed driver is a real process; the other commands run in this process
(``tests/inprocess.py``), on the embedded Ray the tests share."""

from __future__ import annotations

import os
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

pytestmark = pytest.mark.slow


def write_spec(tmp_path: Path, name: str) -> Path:
    spec: dict[str, Any] = {
        "name": name, "dataset": {"name": "mnist-5k"}, "device": "cpu",
        "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"},
        "search": {"prune_rate": [0.0, 0.5], "clip_norm": 1.0,
                   "noise_multiplier": {"low": 1.0, "high": 3.0}, "learning_rate": 2.0,
                   "batch_size": 500, "max_epochs": 2},
        "trials": 3, "max_concurrent": 2, "sampler": "random",
        "storage": str(tmp_path / "runs"), "results": str(tmp_path / "results" / name)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def rows_of(results: Path, stage: str) -> list[dict]:
    if not (results / "trials.parquet").exists():
        return []
    return [r for r in pq.read_table(results / "trials.parquet").to_pylist()
            if r["stage"] == stage]


def test_confirm_killed_then_rerun_records_each_run_exactly_once(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "conf")
    results = tmp_path / "results" / "conf"
    searched = dpstudy("run", str(spec))
    assert searched.returncode == 0, searched.stdout[-2000:] + searched.stderr[-2000:]
    search = rows_of(results, "search")
    assert len(search) == 3 and search[0]["prune_rate"] == 0.0  # the baseline trial first
    assert all(0.97 <= r["budget_used"] <= 1.0 for r in search if r["status"] == "completed")

    args = [sys.executable, "-m", "study.cli", "confirm", str(results), "--top", "1",
            "--seeds", "2"]
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not rows_of(results, "confirm"):
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            time.sleep(0.5)
        assert rows_of(results, "confirm"), "no confirmation run was recorded in time"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=120)
    finally:
        _kill_group(driver.pid)
    partial = rows_of(results, "confirm")

    again = dpstudy("confirm", str(results), "--top", "1", "--seeds", "2")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    runs = rows_of(results, "confirm")
    configs = {r["config_id"] for r in runs}
    best = max((r for r in search if r["status"] == "completed"),
               key=lambda r: r["val_accuracy"])
    assert best["trial_id"] in configs and configs <= {r["trial_id"] for r in search}
    assert len(runs) == 2 * len(configs) and len({r["trial_id"] for r in runs}) == len(runs)
    assert {r["trial_id"] for r in partial} <= {r["trial_id"] for r in runs}
    assert {r["seed"] for r in runs} == {1, 2} and all(r["status"] == "completed" for r in runs)
    assert all(0.97 <= r["budget_used"] <= 1.0 for r in runs)
    for r in runs:  # a confirmation run re-trains its configuration's hyperparameters
        source = next(s for s in search if s["trial_id"] == r["config_id"])
        assert (r["prune_rate"], r["params"]) == (source["prune_rate"], source["params"])
    assert "ci95_low" in again.stdout and best["trial_id"] in again.stdout

    report = dpstudy("report", str(results), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr[-2000:]
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Confirmation across seeds" in page and "Selection was made on the validation" in page
