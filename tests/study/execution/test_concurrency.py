"""Real drivers at the same time: studies sharing a results root, one driver per study,
Ctrl-C, and kill -9 while trials finish. The drivers that race, get interrupted or killed
are real processes; the commands run after them (a refused second driver, a resume) run in
this process (``tests/inprocess.py``), on the embedded Ray the tests share."""

from __future__ import annotations

import glob
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from inprocess import dpstudy

from study.storage.read import read_epochs, read_trials

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]


SEARCH: dict[str, Any] = {"prune_rate": {"low": 0.0, "high": 0.8}, "drop_rate": 0.0,
                          "clip_norm": 1.0, "noise_multiplier": {"low": 0.5, "high": 3.0},
                          "learning_rate": 1.0, "batch_size": 500, "max_epochs": 1}


def tiny_spec(tmp_path: Path, name: str, results: str, **overrides: Any) -> Path:
    spec: dict[str, Any] = {
        "name": name, "seed": 0, "device": "cpu",
        "dataset": {"name": "mnist-5k"}, "model": {"name": "cnn-mnist"},
        "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"},
        "search": SEARCH, "trials": 2, "max_concurrent": 1,
        "resources_per_trial": {"cpu": 1, "gpu": 0},
        "scheduler": "none", "storage": str(tmp_path / "runs"), "results": results,
    }
    spec.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "study.cli", *args], cwd=cwd, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, umask=0o022)  # the usual default


def wait_for(condition, what: str, procs: list[subprocess.Popen], timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for p in procs:
            assert p.poll() is None, f"driver ended before {what}: {p.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def test_two_studies_share_a_results_root_and_each_has_one_driver(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    spec_a = tiny_spec(tmp_path, "alpha", str(shared), trials=2,  # long enough to race
                       search={**SEARCH, "max_epochs": 2})  # (the race is tried at its start)
    spec_b = tiny_spec(tmp_path, "beta", "shared")  # relative: resolved once, at run
    drivers = {"alpha": start("run", str(spec_a), cwd=tmp_path),
               "beta": start("run", str(spec_b), cwd=tmp_path)}
    try:
        alpha_dir = tmp_path / "runs" / "alpha"
        wait_for(lambda: (alpha_dir / "dpstudy-spec.yaml").exists(), "alpha started",
                 list(drivers.values()))
        racing = dpstudy("resume", str(alpha_dir), cwd=elsewhere)
        assert drivers["alpha"].poll() is None, "alpha finished before the race was tried"
        assert racing.returncode == 2, racing.stdout[-2000:] + racing.stderr[-2000:]
        assert "already being run by another driver" in racing.stderr
        assert f"pid {drivers['alpha'].pid}" in racing.stderr and "since 20" in racing.stderr
        again = dpstudy("run", str(spec_a), cwd=tmp_path)
        assert again.returncode == 2 and "already" in again.stderr, again.stderr[-2000:]
        for name, proc in drivers.items():
            out, err = proc.communicate(timeout=1800)
            assert proc.returncode == 0, f"{name}: {out[-2000:]}{err[-2000:]}"
    finally:
        for proc in drivers.values():
            kill_group(proc)

    rows = read_trials(str(shared)).to_pylist()
    per_study = {s: sorted(r["trial_id"] for r in rows if r["study"] == s)
                 for s in ("alpha", "beta")}
    assert {s: len(ids) for s, ids in per_study.items()} == {"alpha": 2, "beta": 2}
    assert all(r["status"] == "completed" for r in rows)
    epochs = read_epochs(str(shared)).to_pylist()
    for row in rows:  # every trial's epochs, once each
        mine = sorted(e["epoch"] for e in epochs
                      if (e["study"], e["trial_id"]) == (row["study"], row["trial_id"]))
        assert mine == list(range(1, len(mine) + 1)) and mine
    saved = yaml.safe_load((tmp_path / "runs" / "beta" / "dpstudy-spec.yaml").read_text())
    assert saved["results"] == str(shared)  # stored absolute

    resumed = dpstudy("resume", "beta", "--storage", "../runs", cwd=elsewhere)  # relative
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list(elsewhere.iterdir()) == []  # no second, partial results set
    assert read_trials(str(shared)).num_rows == 4
    assert not list((tmp_path / "runs" / "alpha" / ".dpstudy-lock").glob("*.lock"))


def test_ctrl_c_exits_130_records_nothing_unfinished_and_resumes(tmp_path: Path) -> None:
    results = tmp_path / "results"
    spec = tiny_spec(tmp_path, "interrupted", str(results), max_concurrent=2,
                     search={"prune_rate": 0.5, "drop_rate": 0.0, "clip_norm": 1.0,
                             "noise_multiplier": {"low": 0.5, "high": 3.0},
                             "learning_rate": 1.0, "batch_size": 500, "max_epochs": 2})
    driver = start("run", str(spec), cwd=tmp_path)
    experiment = tmp_path / "runs" / "interrupted"
    try:
        wait_for(lambda: glob.glob(str(experiment / "*" / "checkpoint_000000")),
                 "a first epoch", [driver])
        os.kill(driver.pid, signal.SIGINT)
        out, err = driver.communicate(timeout=900)
    finally:
        kill_group(driver)
    assert driver.returncode == 130, out[-2000:] + err[-2000:]
    assert f"dpstudy resume {experiment}" in err
    for stored in glob.glob(str(experiment / "*" / "checkpoint_*")):  # Tune's copies: private
        assert os.stat(stored).st_mode & 0o777 == 0o700, stored
        assert {os.stat(f).st_mode & 0o777 for f in glob.glob(f"{stored}/*")} == {0o600}
    assert "finished:" not in out
    try:
        recorded = read_trials(str(results)).to_pylist()
    except FileNotFoundError:
        recorded = []
    assert all(r["status"] == "completed" for r in recorded)  # no fake 'stopped' outcomes

    resumed = dpstudy("resume", "runs/interrupted", cwd=tmp_path)  # relative: made absolute
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = read_trials(str(results)).to_pylist()
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    epochs = read_epochs(str(results)).to_pylist()
    for row in rows:  # each trial's epochs once, none lost across the interruption
        mine = sorted(e["epoch"] for e in epochs if e["trial_id"] == row["trial_id"])
        assert mine == list(range(1, len(mine) + 1)) and mine


def kill_resume_benchmark() -> Any:
    path = ROOT / "benchmarks" / "kill_resume.py"
    module_spec = importlib.util.spec_from_file_location("kill_resume", path)
    kill_resume = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(kill_resume)
    return kill_resume


def test_kill_while_trials_finish_reruns_nothing(tmp_path: Path) -> None:
    """kill -9 right after a trial trained its last epoch (and the other one is running):
    resume re-runs no finished trial and restarts no trial from scratch."""
    figures = kill_resume_benchmark().one_moment("last-epoch", ROOT, trials=3, epochs=2)
    assert figures["resume_exit"] == 0, figures.get("resume_output", "")[-3000:]
    assert figures["rows"] == 3 and figures["duplicates"] == 0 and figures["all_completed"]
    assert figures["extra_ids"] == 0 and figures["finished_rerun"] == 0
    assert figures["finished_restored"] == 0, figures  # not even from its last checkpoint
    assert figures["restarted_from_scratch"] == 0
    # at most the epochs whose report was in flight at the kill are trained again
    assert figures["retrained"] <= 2, figures


def test_kill_after_a_checkpoint_before_its_report_retrains_nothing() -> None:
    """kill -9 of the driver (and the trial's process) after a trial wrote its epoch-1
    checkpoint but before Tune stored or recorded it: the resumed trial continues from that
    checkpoint, the newest complete one on disk, and trains no epoch twice."""
    figures = kill_resume_benchmark().one_moment("unreported", ROOT, trials=1, epochs=2)
    assert figures["resume_exit"] == 0, figures.get("resume_output", "")[-3000:]
    assert figures["rows"] == 1 and figures["duplicates"] == 0 and figures["all_completed"]
    assert figures["restarted_from_scratch"] == 0 and figures["retrained"] == 0, figures
    assert figures["epochs_trained"] == 2
