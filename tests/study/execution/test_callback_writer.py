"""StudyCallback writes Parquet off Tune's controller thread, and loses nothing doing so."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from study.execution.callbacks import StudyCallback, Writer
from study.spec.model import StudySpec
from study.storage.read import read_trials
from study.storage.store import ResultsStore

ROOT = Path(__file__).resolve().parents[3]

DEADLINE_S = 60.0


def spec(tmp_path: Path) -> StudySpec:
    return StudySpec.from_dict({
        "name": "writer", "dataset": {"name": "mnist-5k"}, "device": "cpu",
        "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"},
        "search": {"prune_rate": [0.0, 0.5], "clip_norm": 1.0, "noise_multiplier": 1.2,
                   "learning_rate": 2.0, "batch_size": 256, "max_epochs": 2},
        "trials": 2, "results": str(tmp_path / "results"), "storage": str(tmp_path / "runs")})


def trial(trial_id: str, prune: float) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"prune_rate": prune},
                           status="TERMINATED",
                           last_result={"finished": True, "val_accuracy": 0.5,
                                        "test_accuracy": 0.5, "epsilon_spent": 2.9})


def test_step_end_does_not_wait_for_the_parquet_write(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """While a write is stuck (the flush waits on an event), ``on_step_end`` returns; the
    row is in Parquet once ``on_experiment_end`` returns, written once."""
    release, entered = threading.Event(), threading.Event()
    real_flush = ResultsStore.flush

    def slow_flush(self: ResultsStore) -> None:
        entered.set()
        assert release.wait(DEADLINE_S), "test never released the write"
        real_flush(self)

    monkeypatch.setattr(ResultsStore, "flush", slow_flush)
    callback = StudyCallback(spec(tmp_path))
    callback.setup()
    done = [trial("t1", 0.0), trial("t2", 0.5)]
    for t in done:
        callback.on_trial_complete(1, done, t)
    started = time.monotonic()
    callback.on_step_end(1, done)
    returned = time.monotonic() - started
    assert entered.wait(DEADLINE_S), "the writer never started writing"
    assert not release.is_set() and returned < DEADLINE_S  # returned with the write stuck
    assert not list((tmp_path / "results").glob("trials.parquet/*.parquet"))
    release.set()
    callback.on_experiment_end(done)
    rows = read_trials(str(tmp_path / "results")).to_pylist()
    assert sorted(r["trial_id"] for r in rows) == ["t1", "t2"]


def test_a_failed_write_is_raised_at_experiment_end(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A write error is not swallowed on the writer thread: the experiment end raises it,
    after the other trials were still written."""
    real_add = ResultsStore.add_trial

    def add(self: ResultsStore, row: dict, epochs: list[dict]) -> None:
        if row["trial_id"] == "bad":
            raise OSError("disk full")
        real_add(self, row, epochs)

    monkeypatch.setattr(ResultsStore, "add_trial", add)
    callback = StudyCallback(spec(tmp_path))
    callback.setup()
    done = [trial("bad", 0.0), trial("good", 0.5)]
    for t in done:
        callback.on_trial_complete(1, done, t)
    callback.on_step_end(1, done)
    with pytest.raises(OSError, match="disk full"):
        callback.on_experiment_end(done)
    assert [r["trial_id"] for r in read_trials(str(tmp_path / "results")).to_pylist()] \
        == ["good"]


def test_writer_keeps_order_and_wait_blocks_until_written() -> None:
    written: list[Any] = []
    writer = Writer(written.append)
    items = [(str(i), {}, None, None) for i in range(20)]
    for item in items:
        writer.submit(item)
    writer.wait()
    assert written == items


def test_a_hung_write_does_not_keep_the_driver_from_exiting() -> None:
    """The writer is a daemon: a write to a store that stopped answering is abandoned at
    exit (the next finish or resume records that row), not waited for."""
    code = ("import threading\n"
            "from study.execution.callbacks import Writer\n"
            "started = threading.Event()\n"
            "def hang(item):\n"
            "    started.set()\n"
            "    threading.Event().wait()\n"
            "Writer(hang).submit(('t', None))\n"
            "assert started.wait(60)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]


def test_time_line_puts_wall_next_to_training_over_concurrency(tmp_path: Path) -> None:
    from study.execution.runner import time_line

    grid = [SimpleNamespace(metrics={"wall_time_s": 30.0}), SimpleNamespace(metrics={}),
            SimpleNamespace(metrics={"wall_time_s": 10.0})]
    s = spec(tmp_path)  # max_concurrent 1
    assert time_line(s, grid, 44.0) == ("[writer] time: wall 44.0 s; trials' training 40.0 s "
                                        "/ concurrency 1 = 40.0 s (1.10x)")


def test_the_final_progress_line_is_printed_when_the_last_trial_ends_between_steps(
        tmp_path: Path) -> None:
    """Tune may end the experiment without another step after the last trial finished: the
    progress line that counts it is printed at the experiment's end, once."""
    import io

    stream = io.StringIO()
    callback = StudyCallback(spec(tmp_path))
    callback.stream = stream
    callback.setup()
    first = trial("t1", 0.0)
    second = SimpleNamespace(trial_id="t2", config={"prune_rate": 0.5}, status="RUNNING",
                             last_result={})
    callback.on_step_end(1, [first, second])
    assert "1/2 done" in stream.getvalue()
    second = trial("t2", 0.5)  # finished after the last step
    callback.on_trial_complete(2, [first, second], second)
    callback.on_experiment_end([first, second])
    lines = stream.getvalue().splitlines()
    assert sum("2/2 done" in line for line in lines) == 1, lines
    callback.on_experiment_end([first, second])  # nothing new: not printed again
    assert stream.getvalue().splitlines() == lines
