"""The recipe settings in the study spec: searchable K and EMA decay, the physical batch
as a resource setting, bf16; spec errors naming the field; trial configs, Parquet rows,
the JSON Schema and release (averaged weights)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from study.cli import main
from study.execution.callbacks import trial_row
from study.privacy.release import model_weights
from study.spec.model import SpecError, StudySpec
from study.spec.schema import spec_schema
from study.storage.schema import TRIALS_SCHEMA
from trainables.config import TrialConfig
from trainables.tune_trainable import CONFIG_KEY, reported_config

GOOD: dict[str, Any] = {
    "name": "recipe", "dataset": {"name": "mnist-5k"}, "model": {"name": "cnn-mnist"},
    "privacy": {"epsilon": 3.0, "delta": 1e-5},
    "optimizer": {"physical_batch_size": 128},
    "search": {"clip_norm": 1.0, "noise_multiplier": {"low": 0.5, "high": 2.0},
               "learning_rate": 1.0, "batch_size": 1024, "max_epochs": 1,
               "augmentation_multiplicity": [1, 4, 8], "ema_decay": {"low": 0.9,
                                                                     "high": 0.999}},
    "trials": 2,
}


def spec(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(GOOD)
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    return data


def problems(**changes: Any) -> list[str]:
    with pytest.raises(SpecError) as err:
        StudySpec.from_dict(spec(**changes))
    return err.value.problems


def test_searched_k_and_decay_reach_the_trial_config_and_the_row() -> None:
    s = StudySpec.from_dict(spec())
    space = s.parameters()
    assert space["augmentation_multiplicity"].choices == (1, 4, 8)
    assert space["ema_decay"].distribution_kind() == "float"
    cfg = s.trial_config({"noise_multiplier": 1.0, "augmentation_multiplicity": 4,
                          "ema_decay": 0.99})
    trial = TrialConfig.from_dict(cfg)
    assert trial.optim.augmentation_multiplicity == 4 and trial.optim.ema_decay == 0.99
    assert trial.optim.physical_batch_size == 128 and trial.precision == "fp32"
    reported = {CONFIG_KEY: reported_config(cfg)}  # what the trial reports
    row = trial_row(s, "t1", {"noise_multiplier": 1.0, "augmentation_multiplicity": 4,
                              "ema_decay": 0.99}, reported, status="completed")
    assert (row["augmentation_multiplicity"], row["ema_decay"], row["physical_batch_size"],
            row["precision"]) == (4, 0.99, 128, "fp32")
    for column in ("augmentation_multiplicity", "ema_decay", "physical_batch_size",
                   "precision"):
        assert column in TRIALS_SCHEMA.names
    plain = StudySpec.from_dict(spec(search__augmentation_multiplicity=1,
                                     search__ema_decay=None))
    cfg = plain.trial_config({"noise_multiplier": 1.0})
    assert cfg["optim"]["augmentation_multiplicity"] == 1 and cfg["optim"]["ema_decay"] is None


def test_bad_values_are_spec_errors_naming_the_field() -> None:
    assert problems(search__augmentation_multiplicity=0) == [
        "search.augmentation_multiplicity: must be >= 1 (got 0)"]
    assert problems(search__ema_decay=1.0) == ["search.ema_decay: must be < 1 (got 1.0)"]
    assert problems(search__ema_decay={"low": 0, "high": 0.9})[0].startswith(
        "search.ema_decay.low: must be > 0")
    assert problems(optimizer={"physical_batch_size": 10**6}) == [
        "optimizer.physical_batch_size: must be <= 65536 (got 1000000)"]
    assert problems(optimizer={"physical_batch_size": 4})[0].startswith(
        "optimizer.physical_batch_size: must be >= the largest "
        "search.augmentation_multiplicity = 8")
    assert problems(precision="bf16")[0].startswith("precision: bf16 needs a CUDA device")
    assert problems(precision="fp16")[0].startswith("precision: must be one of fp32, bf16")


def test_cli_refuses_a_bad_k_before_anything_starts(tmp_path: Path, capsys) -> None:
    data = spec(search__augmentation_multiplicity=0)
    data["storage"], data["results"] = str(tmp_path / "runs"), str(tmp_path / "results")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "search.augmentation_multiplicity: must be >= 1 (got 0)" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_schema_lists_the_new_fields() -> None:
    schema = spec_schema()
    defs = schema["$defs"]
    assert "precision" in schema["properties"]
    assert schema["properties"]["precision"]["enum"] == ["fp32", "bf16"]
    assert "physical_batch_size" in defs["OptimizerSpec"]["properties"]
    assert {"augmentation_multiplicity", "ema_decay"} <= set(defs["SearchSpec"]["properties"])


def test_release_publishes_the_averaged_weights(tmp_path: Path) -> None:
    ckpt = tmp_path / "exp" / "train_abc123_00000" / "checkpoint_000001"
    os.makedirs(ckpt)
    from trainables import checkpoint

    payload = {k: {} for k in checkpoint._KEYS} | {"format": checkpoint.FORMAT_VERSION}
    payload["model"] = {"w": torch.ones(2), "b": torch.zeros(1)}
    payload["ema"] = {"decay": 0.9, "steps": 3, "average": {"w": torch.full((2,), 0.5)}}
    torch.save(payload, ckpt / checkpoint.FILENAME)
    weights = model_weights(str(tmp_path / "exp"), "abc123")
    assert torch.equal(weights["w"], torch.full((2,), 0.5)) and torch.equal(
        weights["b"], torch.zeros(1))
