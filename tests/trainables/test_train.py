"""The train loop on real MNIST images (mnist-5k): learning, privacy, pruning, resume."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from trainables import checkpoint, randomness
from trainables.accounting import epsilon_after
from trainables.train import build_run, train

pytestmark = pytest.mark.slow

BASE: dict[str, Any] = {
    "seed": 3,
    "device": "cpu",
    "dataset": {"name": "mnist-5k"},
    "privacy": {"epsilon": 8.0, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.0},
    "optim": {"learning_rate": 2.0, "clip_norm": 1.0, "batch_size": 500, "max_epochs": 2},
    "pruning": {"rate": 0.5, "criterion": "magnitude"},
    "dropping": {"rate": 0.5, "criterion": "random"},
}


def config(**overrides: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(BASE)
    for key, value in overrides.items():
        cfg[key].update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    return cfg


def test_real_training_beats_chance_and_stays_within_budget() -> None:
    reports: list[dict[str, Any]] = []
    final = train(config(optim={"batch_size": 256, "max_epochs": 3}),
                  report=lambda m, _d: reports.append(m))
    assert final["test_accuracy"] > 0.6  # chance is 0.1
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    assert all(r["epsilon_spent"] <= 8.0 for r in reports)
    assert reports[0]["epsilon_spent"] < reports[-1]["epsilon_spent"]
    # sigma 1.0 reaches the 3-epoch cap first: the plan lowers the noise to spend the budget
    assert final["noise_multiplier"] <= 1.0 and 0.97 * 8.0 <= final["epsilon_spent"] <= 8.0
    assert final["epsilon_spent"] == pytest.approx(epsilon_after(
        final["steps"], noise_multiplier=final["noise_multiplier"],
        sample_rate=final["sample_rate"], delta=1e-5, accountant="rdp"))
    assert final["steps"] == final["steps_planned"]
    assert final["density"] == pytest.approx(0.5, abs=0.01)
    assert 0.45 < final["drop_rate_effective"] < 0.55
    assert final["samples_per_s"] > 0 and final["finished"] is True


def test_pruned_weights_stay_exactly_zero_with_momentum_and_decay(tmp_path) -> None:
    cfg = config(optim={"momentum": 0.9, "weight_decay": 1e-3, "max_epochs": 1},
                 checkpoint_dir=str(tmp_path))
    train(cfg)
    state = checkpoint.load(str(tmp_path))
    assert state["masks"]
    for name, mask in state["masks"].items():
        weight = state["model"][name]
        assert torch.all(weight[~mask] == 0)
        assert torch.count_nonzero(weight[mask]) > 0.9 * int(mask.sum())


def test_resume_gives_the_same_model_and_epsilon(tmp_path, monkeypatch) -> None:
    """With the default secret noise seed: a resumed trial continues its own secret stream
    exactly (the uninterrupted run below is given the same secret seed to compare)."""
    monkeypatch.setattr(randomness, "draw_secret_seed", lambda: 987654321)
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full = train(config(checkpoint_dir=str(full_dir)))

    class Crash(Exception):
        pass

    def crash_after_first_epoch(metrics: dict[str, Any], _dir: str | None) -> None:
        raise Crash

    with pytest.raises(Crash):
        train(config(checkpoint_dir=str(part_dir)), report=crash_after_first_epoch)
    assert checkpoint.load(str(part_dir))["progress"]["epoch"] == 1
    resumed = train(config(checkpoint_dir=str(part_dir)), resume_from=str(part_dir))

    assert resumed["epsilon_spent"] == full["epsilon_spent"]
    assert resumed["steps"] == full["steps"]
    assert resumed["test_accuracy"] == full["test_accuracy"]
    a, b = checkpoint.load(str(full_dir)), checkpoint.load(str(part_dir))
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-6)
    assert a["accountant"]["history"] == b["accountant"]["history"]
    assert len(b["progress"]["history"]) == 2
    noise = b["rng"]["generators"]["noise"]
    assert noise["seed"] == randomness.derived_seed(987654321, "noise")
    assert noise["seed"] != randomness.derived_seed(BASE["seed"], "noise")


def test_structured_pruning_trains_a_smaller_model() -> None:
    run = build_run(__import__("trainables.config", fromlist=["TrialConfig"]).TrialConfig
                    .from_dict(config(pruning={"rate": 0.75, "granularity": "structured",
                                               "scope": "layerwise"})))
    assert run.pruned.params_after < 0.2 * run.pruned.params_before
    assert sum(p.numel() for p in run.model.parameters()) == run.pruned.params_after
