"""Logical vs physical batch: chunked DP steps equal unchunked ones (masks, dropping,
secret-noise seeding, augmentation views), empty and very large draws, one noise draw and
one accountant step per logical batch."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from trainables.logical_batch import average_views, logical_step
from trainables.train import build_run, train_epoch

BASE: dict[str, Any] = {
    "seed": 5, "device": "cpu", "reproducible_noise": True, "dataset": {"name": "mnist-5k"},
    "privacy": {"epsilon": 8.0, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.0},
    "optim": {"learning_rate": 1.0, "momentum": 0.9, "batch_size": 300, "max_epochs": 1},
    "pruning": {"rate": 0.5, "criterion": "magnitude"},
    "dropping": {"rate": 0.5, "criterion": "random"},
}


def run_of(**optim: Any):
    cfg = copy.deepcopy(BASE)
    cfg["optim"].update(optim)
    with pytest.warns(UserWarning, match="reproducible_noise"):
        return build_run(cfg_from(cfg))


def cfg_from(data: dict[str, Any]):
    from trainables.config import TrialConfig

    return TrialConfig.from_dict(data)


def weights(run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.model._module.state_dict().items()}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-5, worst
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2])
def test_chunked_update_equals_unchunked(k: int) -> None:
    whole, chunked = run_of(augmentation_multiplicity=k), run_of(
        augmentation_multiplicity=k, physical_batch_size=97 * k)
    before = weights(whole)
    train_epoch(whole, 3)
    train_epoch(chunked, 3)
    assert any(float((before[n] - w).abs().max()) > 1e-3 for n, w in weights(whole).items())
    assert_close(weights(whole), weights(chunked))
    # one accountant step and one optimizer step per logical batch, not per chunk
    assert whole.accountant.history == chunked.accountant.history
    assert sum(n for *_, n in chunked.accountant.history) == 3
    state = chunked.optimizer.original_optimizer.state
    assert all(torch.equal(state[p]["momentum_buffer"], whole.optimizer.original_optimizer
                           .state[q]["momentum_buffer"]) or
               float((state[p]["momentum_buffer"] - whole.optimizer.original_optimizer
                      .state[q]["momentum_buffer"]).abs().max()) < 1e-5
               for p, q in zip(chunked.optimizer.params, whole.optimizer.params, strict=True))
    # pruned coordinates stay exactly zero, dropping masks are shared by the chunks
    for name, mask in chunked.pruned.masks.items():
        assert torch.all(weights(chunked)[name][~mask] == 0)


@pytest.mark.slow
def test_keep_mask_is_drawn_once_per_logical_batch() -> None:
    run = run_of(physical_batch_size=128)
    calls = []
    select = run.optimizer.select
    run.optimizer.select = lambda: calls.append(1) or select()
    train_epoch(run, 2)
    assert len(calls) == 2


@pytest.mark.slow
def test_empty_and_very_large_draws() -> None:
    run = run_of(physical_batch_size=400)
    train = run.data.train
    noise_calls = []
    add_noise = run.optimizer.add_noise
    run.optimizer.add_noise = lambda: noise_calls.append(1) or add_noise()
    before = weights(run)
    logical_step(run.model, run.optimizer, train, torch.zeros(0, dtype=torch.long),
                 run.batching)
    assert noise_calls == [1]  # a noise-only step
    assert any(not torch.equal(before[k], v) for k, v in weights(run).items())
    big = torch.arange(len(train))  # every example: 12x the expected batch, 9 chunks
    loss = logical_step(run.model, run.optimizer, train, big, run.batching)
    assert noise_calls == [1, 1] and torch.isfinite(loss)
    assert sum(n for *_, n in run.accountant.history) == 2


def test_view_gradients_are_averaged_before_clipping() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    plain = copy.deepcopy(net)
    gsm = GradSampleModule(net, batch_first=True, loss_reduction="mean")
    x, y = torch.randn(4 * 3, 1, 3, 4), torch.tensor([0, 1, 2, 1]).repeat_interleave(3)

    class Opt:
        params = [p for p in gsm.parameters()]

    nn.functional.cross_entropy(gsm(x), y).backward()
    average_views(Opt, 3)
    for i in range(4):
        plain.zero_grad()
        views = slice(3 * i, 3 * i + 3)
        nn.functional.cross_entropy(plain(x[views]), y[views]).backward()  # mean of 3 views
        for p, q in zip(Opt.params, plain.parameters(), strict=True):
            assert p.grad_sample.shape[0] == 4
            assert torch.allclose(p.grad_sample[i], q.grad, atol=1e-6)
