"""A trial killed after it wrote an epoch's checkpoint but before Tune stored and recorded
it: its next run continues from that checkpoint (the trial's own one, kept in its folder
of a local storage) instead of training the epoch again."""

from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.fs as pafs
import pytest

from trainables import checkpoint, tune_trainable

CONFIG: dict[str, Any] = {
    "seed": 4, "device": "cpu", "dataset": {"name": "mnist-5k"},
    "privacy": {"epsilon": 8.0, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.0},
    "optim": {"learning_rate": 1.0, "batch_size": 1000, "max_epochs": 2},
}


class Killed(BaseException):
    """The process dies between the checkpoint and its report."""


@pytest.fixture
def tune_session(monkeypatch, tmp_path: Path) -> dict[str, Any]:
    """run_trial under a stand-in for Ray Tune's session: a local trial folder; ``kill``
    makes the first report die before Tune stores anything."""
    import ray
    from ray import tune

    trial = tmp_path / "exp" / "trial_0"
    trial.mkdir(parents=True)
    state: dict[str, Any] = {"trial": trial, "reports": [], "kill": False}

    def report(metrics: dict[str, Any], checkpoint: Any = None) -> None:
        if state["kill"]:
            state["kill"] = False
            raise Killed
        state["reports"].append(metrics)

    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: SimpleNamespace(get_assigned_resources=lambda: {}))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)  # Tune recorded none
    monkeypatch.setattr(tune, "report", report)
    monkeypatch.setattr(tune_trainable, "trial_storage",
                        lambda: (pafs.LocalFileSystem(), str(trial)))
    return state


@pytest.mark.slow  # two short trainings (about 20 s on 2 cores)
def test_the_next_run_continues_from_the_unreported_checkpoint(tune_session) -> None:
    tune_session["kill"] = True
    with pytest.raises(Killed):
        tune_trainable.run_trial(copy.deepcopy(CONFIG))
    own = tune_session["trial"] / tune_trainable.OWN_CHECKPOINT
    assert checkpoint.load(str(own))["progress"]["epoch"] == 1  # written, never reported
    assert stat.S_IMODE(os.stat(own).st_mode) == 0o700
    (own / f".{checkpoint.FILENAME}.tmp-99999").write_bytes(b"cut short by the kill")

    final = tune_trainable.run_trial(copy.deepcopy(CONFIG))
    assert [m["epoch"] for m in tune_session["reports"]] == [2]  # epoch 1 not trained again
    assert [e["epoch"] for e in json.loads(tune_session["reports"][-1]["epoch_history"])] \
        == [1, 2]
    assert final["finished"]
    assert not own.exists()  # the finished trial's copy is redundant: Tune stored every epoch


def test_an_object_store_trial_keeps_its_checkpoint_in_a_temporary_folder() -> None:
    class Remote:
        type_name = "s3"

    assert tune_trainable.own_checkpoint_dir((Remote(), "bucket/exp/trial")) is None
    assert tune_trainable.own_checkpoint_dir(None) is None
    assert tune_trainable.own_checkpoint_dir((pafs.LocalFileSystem(), "/r/exp/t")) == \
        os.path.join("/r/exp/t", tune_trainable.OWN_CHECKPOINT)
