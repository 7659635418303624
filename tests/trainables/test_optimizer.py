"""MaskedDPOptimizer: masking before clipping, noise only where kept, frozen state."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from trainables.dropping import MagnitudeSelector, RandomSelector
from trainables.optimizer import MaskedDPOptimizer


def tiny_model(seed: int = 0) -> GradSampleModule:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    return GradSampleModule(model, batch_first=True, loss_reduction="sum")


def masked_optimizer(model: GradSampleModule, *, sigma: float = 0.0, clip: float = 1.0,
                     trainable=None, selector=None, momentum: float = 0.0,
                     lr: float = 1.0) -> MaskedDPOptimizer:
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return MaskedDPOptimizer(base, trainable=trainable, selector=selector,
                             noise_multiplier=sigma, max_grad_norm=clip,
                             expected_batch_size=1, loss_reduction="sum",
                             generator=torch.Generator().manual_seed(1))


def half_masks(model: nn.Module, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(p.shape, generator=g) < 0.5 for p in model.parameters()]


def backward_one(model: GradSampleModule, x: torch.Tensor, y: torch.Tensor) -> None:
    nn.functional.cross_entropy(model(x), y, reduction="sum").mul(50.0).backward()


def test_per_sample_norm_after_masking_and_clipping_is_at_most_c() -> None:
    """With one example per step, the summed clipped gradient IS the per-sample one."""
    clip = 0.05
    model = tiny_model()
    trainable = half_masks(model)
    opt = masked_optimizer(model, clip=clip, trainable=trainable)
    for i in range(5):
        x = torch.randn(1, 6, generator=torch.Generator().manual_seed(i))
        y = torch.tensor([i % 3])
        # reference: the masked per-sample gradient, clipped by hand
        ref = torch.autograd.grad(
            nn.functional.cross_entropy(model._module(x), y, reduction="sum").mul(50.0),
            list(model.parameters()))
        ref = [g * m for g, m in zip(ref, trainable, strict=True)]
        norm = torch.sqrt(sum((g ** 2).sum() for g in ref))
        assert norm > clip  # clipping really happens
        opt.zero_grad()
        backward_one(model, x, y)
        opt.pre_step()
        clipped = [p.summed_grad for p in opt.params]
        got_norm = torch.sqrt(sum((g ** 2).sum() for g in clipped))
        assert got_norm <= clip * (1 + 1e-4)
        # clipping saw only the kept coordinates: the kept part is scaled to exactly C
        assert got_norm == pytest.approx(clip, rel=1e-3)
        for g, r, m in zip(clipped, ref, trainable, strict=True):
            assert torch.all(g[~m] == 0)
            torch.testing.assert_close(g, r * (clip / norm), rtol=1e-3, atol=1e-7)


def test_noise_lands_only_on_kept_coordinates() -> None:
    model = tiny_model()
    trainable = half_masks(model)
    selector = RandomSelector(0.5, generator=torch.Generator().manual_seed(7))
    opt = masked_optimizer(model, sigma=2.0, trainable=trainable, selector=selector)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    for p in opt.params:  # zero gradients: any change is noise
        p.grad_sample = torch.zeros((4, *p.shape))
    opt.step()
    for p, b, keep, t in zip(opt.params, before, opt.keep, trainable, strict=True):
        delta = p.detach() - b
        assert torch.all(delta[~keep] == 0)
        assert torch.all(delta[keep] != 0)
        assert not torch.any(keep & ~t)  # dropping selects among trainable only
    assert 0.2 < opt.kept_fraction < 0.8


def test_unselected_coordinates_and_momentum_untouched() -> None:
    model = tiny_model()
    selector = RandomSelector(0.6, generator=torch.Generator().manual_seed(11))
    opt = masked_optimizer(model, sigma=0.5, selector=selector, momentum=0.9, lr=0.1)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 3
    for _ in range(3):
        params = [p.detach().clone() for p in model.parameters()]
        bufs = [opt.original_optimizer.state.get(p, {}).get("momentum_buffer")
                for p in model.parameters()]
        bufs = [None if b is None else b.clone() for b in bufs]
        opt.zero_grad()
        backward_one(model, x, y)
        opt.step()
        for p, before, buf, keep in zip(opt.params, params, bufs, opt.keep, strict=True):
            assert torch.equal(p.detach()[~keep], before[~keep])
            if keep.any():
                assert not torch.equal(p.detach()[keep], before[keep])
            now = opt.original_optimizer.state[p]["momentum_buffer"]
            expected = torch.zeros_like(now) if buf is None else buf
            assert torch.equal(now[~keep], expected[~keep])


def test_plain_sgd_keeps_frozen_coordinates_without_a_snapshot(monkeypatch) -> None:
    """Plain SGD: a masked update (no clone and restore) leaves unselected and pruned
    coordinates exactly as they were, even when noise reached them (a subclass adding
    noise everywhere); with momentum the snapshot is still taken."""
    model = tiny_model()
    trainable = half_masks(model)
    selector = RandomSelector(0.5, generator=torch.Generator().manual_seed(5))

    class NoiseEverywhere(MaskedDPOptimizer):
        def add_noise(self) -> None:
            DPOptimizer.add_noise(self)  # no masking of the noise

    base = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = NoiseEverywhere(base, trainable=trainable, selector=selector, noise_multiplier=1.0,
                          max_grad_norm=1.0, expected_batch_size=1, loss_reduction="sum",
                          generator=torch.Generator().manual_seed(1))
    assert opt.zero_grad_is_no_update()
    monkeypatch.setattr(MaskedDPOptimizer, "_snapshot_frozen",
                        lambda self: pytest.fail("plain SGD took a snapshot"))
    x, y = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), torch.arange(4) % 3
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        backward_one(model, x, y)
        opt.step()
        for p, old, keep in zip(opt.params, before, opt.keep, strict=True):
            assert torch.equal(p.detach()[~keep], old[~keep])
            if keep.any():
                assert not torch.equal(p.detach()[keep], old[keep])
    assert not masked_optimizer(tiny_model(), momentum=0.9).zero_grad_is_no_update()


def test_magnitude_selector_keeps_largest_trainable_weights() -> None:
    model = tiny_model()
    trainable = half_masks(model)
    params = list(model.parameters())
    keep = MagnitudeSelector(0.5).select(params, trainable)
    for p, k, t in zip(params, keep, trainable, strict=True):
        assert not torch.any(k & ~t)
        assert int(k.sum()) == round(0.5 * int(t.sum()))
        if k.any() and (t & ~k).any():
            assert p.detach().abs()[k].min() >= p.detach().abs()[t & ~k].max()


def test_mask_count_mismatch_is_a_clear_error() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="one mask per parameter"):
        masked_optimizer(model, trainable=half_masks(model)[:1])


def test_top_scores_matches_a_full_sort_without_boolean_indexing() -> None:
    from trainables.dropping import top_scores

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.rand(7, 13, generator=g)
        trainable = torch.rand(7, 13, generator=g) > 0.3
        k = int(round(0.4 * int(trainable.sum())))
        keep = top_scores(scores, k, trainable)
        masked = torch.where(trainable, scores, -float("inf")).flatten()
        expected = torch.zeros(91, dtype=torch.bool)
        expected[masked.argsort(descending=True)[:k]] = True
        assert torch.equal(keep.flatten(), expected)
        assert not (keep & ~trainable).any() and int(keep.sum()) == k


def test_kept_count_stays_on_the_device_and_counts_once() -> None:
    model = tiny_model()
    selector = RandomSelector(0.5, generator=torch.Generator().manual_seed(2))
    opt = masked_optimizer(model, trainable=half_masks(model), selector=selector)
    calls = []
    original = selector.select
    selector.select = lambda *a: calls.append(1) or original(*a)
    backward_one(model, torch.randn(1, 6), torch.tensor([1]))
    opt.step()
    assert torch.is_tensor(opt.kept_count) and opt.kept_count.dim() == 0
    manual = sum(int(k.sum()) for k in opt.keep if k is not None)
    assert float(opt.kept_count) == manual and calls == [1]
    assert opt.kept_fraction == pytest.approx(manual / opt.trainable_count)


def test_magnitude_selector_counts_trainable_coordinates_once(monkeypatch) -> None:
    selector = MagnitudeSelector(0.5)
    params = [nn.Parameter(torch.randn(4, 5)), nn.Parameter(torch.randn(3))]
    trainable = [torch.rand(4, 5) > 0.5, None]
    first = selector.select(params, trainable)
    monkeypatch.setattr(torch.Tensor, "sum", lambda *a, **k: pytest.fail("recounted"))
    second = selector.select(params, trainable)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
