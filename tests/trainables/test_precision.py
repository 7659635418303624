"""``precision: bf16``: autocast forward/backward, float32 per-sample gradients, clipping
and noise. The wrapper's float32 per-sample gradients are checked under CPU autocast (which
torch supports); the trial itself needs CUDA and that test skips without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from trainables.precision import Float32GradSampleModule, autocast, check_precision


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def per_sample(wrapper: type[GradSampleModule], device: str, bf16: bool) -> list[torch.Tensor]:
    model = wrapper(copy.deepcopy(net()).to(device), batch_first=True, loss_reduction="mean")
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    y = torch.tensor([0, 1, 2, 0, 1], device=device)
    ctx = torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else \
        torch.autocast(device_type=device, enabled=False)
    with ctx:
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return [p.grad_sample for p in model.parameters()]


def test_per_sample_gradients_are_float32_under_bf16_autocast() -> None:
    reference = per_sample(GradSampleModule, "cpu", bf16=False)
    plain = per_sample(GradSampleModule, "cpu", bf16=True)
    fixed = per_sample(Float32GradSampleModule, "cpu", bf16=True)
    assert any(g.dtype == torch.bfloat16 for g in plain)  # what Opacus alone gives
    assert all(g.dtype == torch.float32 for g in fixed)
    for g, r in zip(fixed, reference, strict=True):  # bf16 activations: ~1% error typically
        err = (g - r).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1)  # (a ReLU may flip)
        assert float(err.median()) < 0.02
        assert float((g - r).norm() / r.norm()) < 0.2


def test_bf16_is_refused_off_cuda() -> None:
    with pytest.raises(ValueError, match=r"^precision: bf16 needs a CUDA device"):
        check_precision("bf16", torch.device("cpu"))
    check_precision("fp32", torch.device("cpu"))
    assert autocast("fp32", torch.device("cpu")).__class__.__name__ == "nullcontext"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 trials need a CUDA GPU")
def test_bf16_trial_on_cuda_trains_with_float32_dp_state() -> None:
    from trainables.config import TrialConfig
    from trainables.train import build_run, train_epoch

    cfg = TrialConfig.from_dict({
        "device": "cuda", "precision": "bf16", "dataset": {"name": "mnist-5k"},
        "privacy": {"epsilon": 8.0, "delta": 1e-5, "accountant": "rdp",
                    "noise_multiplier": 1.0},
        "optim": {"batch_size": 256, "physical_batch_size": 64, "max_epochs": 1,
                  "augmentation_multiplicity": 2}})
    run = build_run(cfg)
    seen = []
    clip = run.optimizer.clip_and_accumulate

    def spy() -> None:
        seen.extend(p.grad_sample.dtype for p in run.optimizer.params)
        clip()

    run.optimizer.clip_and_accumulate = spy
    train_epoch(run, 2)
    assert seen and all(d == torch.float32 for d in seen)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all()
               for p in run.model.parameters())
