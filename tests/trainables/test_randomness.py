"""Secret noise seeds, reproducible_noise, and generator state that resumes on any device."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch

from trainables import randomness
from trainables.checkpoint import Progress
from trainables.config import TrialConfig
from trainables.train import Run, build_run, epoch_metrics, poisson_batch

SCORES = {"val_loss": 0.0, "val_accuracy": 0.0, "test_loss": 0.0, "test_accuracy": 0.0}
BASE: dict[str, Any] = {
    "seed": 7, "device": "cpu", "dataset": {"name": "mnist-5k"},
    "privacy": {"epsilon": 8.0, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.0},
    "optim": {"learning_rate": 1.0, "batch_size": 500, "max_epochs": 1},
}


def run_of(**extra: Any) -> Run:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_run(TrialConfig.from_dict({**BASE, **extra}))


def noise_only_step(run: Run) -> list[torch.Tensor]:
    """One DP step on an empty batch: the update is the Gaussian noise alone."""
    before = [p.detach().clone() for p in run.optimizer.params]
    run.optimizer.zero_grad(set_to_none=True)
    for p in run.optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
    run.optimizer.step()
    return [p.detach() - b for p, b in zip(run.optimizer.params, before, strict=True)]


def test_same_spec_seed_gives_different_noise_and_batches_by_default() -> None:
    a, b = run_of(), run_of()
    for x, y in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(x, y)  # model init stays seeded from the spec
    da, db = noise_only_step(a), noise_only_step(b)
    assert all(d.abs().sum() > 0 for d in da)
    assert not any(torch.equal(x, y) for x, y in zip(da, db, strict=True))
    batches = [poisson_batch(4000, 0.1, r.generators["sampler"]) for r in (a, b)]
    assert not torch.equal(*batches)


def test_reproducible_noise_matches_and_warns() -> None:
    with pytest.warns(UserWarning, match="reproducible_noise is on"):
        a = build_run(TrialConfig.from_dict({**BASE, "reproducible_noise": True}))
    b = run_of(reproducible_noise=True)
    for x, y in zip(noise_only_step(a), noise_only_step(b), strict=True):
        assert torch.equal(x, y)
    assert a.seeds["noise"] == randomness.derived_seed(BASE["seed"], "noise")
    metrics = epoch_metrics(a, Progress(step=1, epoch=1), train_loss=0.0,
                            scores=SCORES, samples_per_s=1.0, kept=1.0)
    assert metrics["reproducible_noise"] is True


def test_secret_seeds_are_not_reported() -> None:
    run = run_of()
    assert run.seeds["noise"] != randomness.derived_seed(BASE["seed"], "noise")
    assert run.seeds["pruning"] == randomness.derived_seed(BASE["seed"], "pruning")
    metrics = epoch_metrics(run, Progress(step=1, epoch=1), train_loss=0.0,
                            scores=SCORES, samples_per_s=1.0, kept=1.0)
    text = json.dumps(metrics)
    assert metrics["reproducible_noise"] is False
    for name in randomness.SECRET:
        assert str(run.seeds[name]) not in text


def test_secret_seed_comes_from_the_os_csprng(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(randomness.secrets, "randbits", lambda k: calls.append(k) or 12345)
    generators, seeds = randomness.make_generators(0, torch.device("cpu"),
                                                   reproducible_noise=False)
    assert calls == [63]
    assert seeds["noise"] == randomness.derived_seed(12345, "noise")
    assert seeds["sampler"] == randomness.derived_seed(12345, "sampler")
    assert seeds["selector"] == randomness.derived_seed(0, "selector")


def test_same_device_state_restores_exactly() -> None:
    generators, seeds = randomness.make_generators(1, torch.device("cpu"),
                                                   reproducible_noise=False)
    torch.randn(100, generator=generators["noise"])
    records = randomness.generator_records(generators, seeds)
    expected = torch.randn(50, generator=generators["noise"])
    fresh, _ = randomness.make_generators(1, torch.device("cpu"), reproducible_noise=False)
    assert randomness.restore_generators(fresh, records, step=3) == []
    assert torch.equal(torch.randn(50, generator=fresh["noise"]), expected)


def test_a_cuda_generator_state_resumes_on_the_cpu() -> None:
    """A checkpoint written on a GPU node holds a 16-byte Philox state for the noise
    generator; on a CPU node the stream is re-derived from its seed, name and step."""
    generators, seeds = randomness.make_generators(1, torch.device("cpu"),
                                                   reproducible_noise=False)
    records = randomness.generator_records(generators, seeds)
    records["noise"] = {"device": "cuda", "seed": seeds["noise"],
                        "state": torch.zeros(16, dtype=torch.uint8)}
    with pytest.raises(RuntimeError):  # what restoring it naively would do
        torch.Generator().set_state(records["noise"]["state"])
    fresh, _ = randomness.make_generators(1, torch.device("cpu"), reproducible_noise=False)
    with pytest.warns(UserWarning, match=r"another device type.*\['noise'\]"):
        assert randomness.restore_generators(fresh, records, step=40) == ["noise"]
    resumed = torch.randn(20, generator=fresh["noise"])
    expected = torch.Generator().manual_seed(randomness.derived_seed(seeds["noise"], "noise", 40))
    assert torch.equal(resumed, torch.randn(20, generator=expected))
    start = torch.Generator().manual_seed(seeds["noise"])
    assert not torch.equal(resumed, torch.randn(20, generator=start))  # no stream reused


def test_a_cpu_state_resumes_on_a_cuda_generator_by_re_deriving() -> None:
    """The other direction, with the generator's device type forced (no GPU needed)."""

    class FakeCudaGenerator:
        device = torch.device("cuda")

        def manual_seed(self, seed: int) -> FakeCudaGenerator:
            self.seed = seed
            return self

        def set_state(self, state: torch.Tensor) -> None:
            raise AssertionError("a CPU state must not be set on a CUDA generator")

    generators, seeds = randomness.make_generators(2, torch.device("cpu"),
                                                   reproducible_noise=False)
    record = randomness.generator_records(generators, seeds)["noise"]
    target = FakeCudaGenerator()
    assert not randomness.restore_generator(target, record, name="noise", step=9)
    assert target.seed == randomness.derived_seed(seeds["noise"], "noise", 9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_generator_round_trip_and_to_cpu() -> None:
    generators, seeds = randomness.make_generators(3, torch.device("cuda"),
                                                   reproducible_noise=False)
    records = randomness.generator_records(generators, seeds)
    assert records["noise"]["device"] == "cuda" and records["noise"]["state"].numel() == 16
    expected = torch.randn(10, generator=generators["noise"], device="cuda")
    fresh, _ = randomness.make_generators(3, torch.device("cuda"), reproducible_noise=False)
    randomness.restore_generators(fresh, records, step=0)
    assert torch.equal(torch.randn(10, generator=fresh["noise"], device="cuda"), expected)
    cpu, _ = randomness.make_generators(3, torch.device("cpu"), reproducible_noise=False)
    with pytest.warns(UserWarning):
        assert "noise" in randomness.restore_generators(cpu, records, step=5)
