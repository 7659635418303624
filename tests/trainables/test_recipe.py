"""Augmentation views, parameter averaging (EMA) and its resume, and the new optim/precision
fields' spec errors."""

from __future__ import annotations

import copy
import shutil
from typing import Any

import pytest
import torch
from torch import nn

from trainables import checkpoint
from trainables.augment import augmentation_for
from trainables.config import ConfigError, TrialConfig
from trainables.ema import ParameterAverage
from trainables.train import build_run, evaluate, restore, train, train_epoch


def test_digit_views_translate_without_flips_and_cifar_views_flip() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.arange(2 * 1 * 28 * 28, dtype=torch.float32).view(2, 1, 28, 28)
    digits = augmentation_for("mnist-5k")
    views = digits.draw(200, g)
    assert not views.flips.any() and views.offsets.min() >= 0 and views.offsets.max() <= 4
    out = digits.apply(images.repeat(100, 1, 1, 1), views)
    assert out.shape == (200, 1, 28, 28)
    centred = (views.offsets == 2).all(1)
    assert torch.equal(out[centred], images.repeat(100, 1, 1, 1)[centred])
    shifted = (views.offsets[:, 0] == 3) & (views.offsets[:, 1] == 2)  # one row down
    i = int(shifted.nonzero()[0])
    assert torch.equal(out[i, 0, :-1], images.repeat(100, 1, 1, 1)[i, 0, 1:])
    cifar = augmentation_for("cifar10")
    views = cifar.draw(400, g)
    assert 100 < int(views.flips.sum()) < 300 and views.offsets.max() <= 8
    # the same generator state gives the same views: chunks slice one draw
    assert torch.equal(cifar.draw(5, torch.Generator().manual_seed(1)).offsets,
                       cifar.draw(5, torch.Generator().manual_seed(1)).offsets)


def test_parameter_average_follows_the_warm_up_formula() -> None:
    net = nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = ParameterAverage(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # decay min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.average["weight"], torch.full((1, 2), 0.9))
    with ema.applied(net):
        assert torch.allclose(net.weight, torch.full((1, 2), 0.9))
    assert torch.all(net.weight == 1.0)


CONFIG: dict[str, Any] = {
    "seed": 2, "device": "cpu", "dataset": {"name": "mnist-5k", "test_fraction": 0.8},
    "privacy": {"epsilon": 8.0, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.0},
    "optim": {"learning_rate": 2.0, "batch_size": 300, "max_epochs": 2, "ema_decay": 0.9,
              "augmentation_multiplicity": 2, "physical_batch_size": 250},
    "pruning": {"rate": 0.5, "criterion": "random"},
}


class Crash(Exception):
    pass


def crash(_metrics: dict[str, Any], _dir: str | None) -> None:
    raise Crash


@pytest.mark.slow
def test_ema_is_evaluated_checkpointed_and_resumed_exactly(tmp_path) -> None:
    partial, whole = tmp_path / "partial", tmp_path / "whole"
    with pytest.raises(Crash):
        train({**CONFIG, "checkpoint_dir": str(partial)}, report=crash)
    state = checkpoint.load(str(partial))
    assert state["ema"]["steps"] == state["progress"]["step"] > 0
    run = build_run(TrialConfig.from_dict(CONFIG))
    restore(run, str(partial))
    with run.evaluated_weights():
        _, acc = evaluate(run.model, run.data.validation, 1024, run.device)
    assert state["progress"]["history"][-1]["val_accuracy"] == acc  # the average, evaluated
    raw = run.model._module.state_dict()
    assert any(not torch.equal(raw[k], v) for k, v in state["ema"]["average"].items())
    for name, mask in state["masks"].items():
        assert torch.all(state["ema"]["average"][name][~mask] == 0)
    shutil.copytree(partial, whole)
    resumed = train({**CONFIG, "checkpoint_dir": str(whole)}, resume_from=str(whole))
    assert resumed["finished"]
    assert resumed["ema_decay"] == 0.9 and resumed["augmentation_multiplicity"] == 2
    assert resumed["physical_batch_size"] == 250
    # the resumed average equals the one an uninterrupted run with the same streams keeps
    cont = build_run(TrialConfig.from_dict(CONFIG))
    restore(cont, str(partial))
    train_epoch(cont, state["plan"]["steps"] - state["progress"]["step"])
    final = checkpoint.load(str(whole))["ema"]["average"]
    for k, v in cont.ema.average.items():
        assert torch.allclose(final[k], v, atol=1e-6), k


def bad(**optim: Any) -> list[str]:
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_dict({"optim": optim})
    return err.value.problems


def test_bad_values_name_the_field() -> None:
    assert bad(augmentation_multiplicity=0) == [
        "optim.augmentation_multiplicity: must be >= 1 (got 0)"]
    assert bad(physical_batch_size=10**6)[0].startswith(
        "optim.physical_batch_size: must be <= 65536 (got 1000000)")
    assert bad(physical_batch_size=3, augmentation_multiplicity=4)[0].startswith(
        "optim.physical_batch_size: must be >= augmentation_multiplicity = 4")
    for decay in (0, 1, 1.5):
        assert bad(ema_decay=decay)[0].startswith("optim.ema_decay: must be")
    with pytest.raises(ConfigError, match=r"precision: bf16 needs a CUDA device"):
        TrialConfig.from_dict({"device": "cpu", "precision": "bf16"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cli_refuses_bf16_without_a_gpu_before_training(capsys) -> None:
    from trainables.__main__ import main

    assert main(["--set", "precision=bf16", "--set", "optim.augmentation_multiplicity=0"]) == 2
    err = capsys.readouterr().err
    assert "optim.augmentation_multiplicity: must be >= 1 (got 0)" in err
    assert main(["--set", "precision=bf16"]) == 2
    err = capsys.readouterr().err
    assert "precision: bf16 needs a CUDA device and none is available (got 'bf16')" in err
    assert "Traceback" not in err


def test_resuming_with_another_physical_batch_is_allowed() -> None:
    base = copy.deepcopy(CONFIG)
    other = copy.deepcopy(CONFIG)
    other["optim"]["physical_batch_size"] = 64
    assert checkpoint.config_differences(TrialConfig.from_dict(base).to_dict(),
                                         TrialConfig.from_dict(other).to_dict()) == []
