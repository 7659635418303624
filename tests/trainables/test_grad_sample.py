"""FastGradSampleModule: per-sample gradients equal to Opacus' own, without ``p.grad``."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from trainables.clipping import OuterProducts, dense, flatten
from trainables.grad_sample import FastGradSampleModule, fast_path, supported, wrap_model
from trainables.models import cnn_mnist, resnet18
from trainables.optimizer import MaskedDPOptimizer

TOL = 1e-5


def small_resnet() -> nn.Module:
    """ResNet-18-GN (conv without bias, GroupNorm, linear head) on 3x8x8 images."""
    return resnet18(num_classes=10, image_shape=(3, 8, 8))


def mixed_model() -> nn.Module:
    """Every fast layer type with every option the models use (strides, padding, dilation,
    groups, no bias), and sampler fallbacks: LayerNorm and a 'same'-padded convolution go
    through Opacus' own grad samplers on the same activations."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
        nn.Conv2d(4, 6, (3, 2), padding=(1, 0), dilation=(1, 2), bias=False), nn.Tanh(),
        nn.Conv2d(6, 6, 1, groups=3), nn.Conv2d(6, 6, 3, padding="same"),
        nn.Flatten(), nn.LayerNorm(6 * 4 * 2), nn.Linear(6 * 4 * 2, 7), nn.Tanh(),
        nn.Linear(7, 5))


CASES = {"cnn-mnist": (lambda: cnn_mnist(num_classes=10, image_shape=(1, 28, 28)), (1, 28, 28)),
         "resnet18-gn": (small_resnet, (3, 8, 8)),
         "mixed": (mixed_model, (2, 8, 8))}


def both(build, shape, batch: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = build()
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 5, (batch,))
    ref = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="mean")
    fast = FastGradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="mean")
    for m in (ref, fast):
        nn.functional.cross_entropy(m(x), y).backward()
    return ref, fast


@pytest.mark.parametrize("case", list(CASES))
def test_per_sample_gradients_equal_opacus_for_every_layer_type(case: str) -> None:
    ref, fast = both(*CASES[case])
    types = set()
    for (name, pr), (_, pf) in zip(ref.named_parameters(), fast.named_parameters(),
                                   strict=True):
        assert pf.grad is None, f"{name}: the summed gradient was computed"
        assert pf.grad_sample.shape == pr.grad_sample.shape, name
        torch.testing.assert_close(pf.grad_sample, pr.grad_sample, atol=TOL, rtol=TOL,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for module in fast._module.modules():
        if any(True for _ in module.parameters(recurse=False)):
            types.add(type(module).__name__)
    expected = {"cnn-mnist": {"Conv2d", "Linear"}, "resnet18-gn": {"Conv2d", "GroupNorm",
                                                                   "Linear"},
                "mixed": {"Conv2d", "GroupNorm", "Linear", "LayerNorm"}}[case]
    assert types == expected


@pytest.mark.parametrize("case", ["cnn-mnist", "mixed"])  # mixed: GroupNorm too
def test_masked_clipped_sums_equal_opacus(case: str) -> None:
    """Masks (pre-pruning and a fresh selection) applied before clipping: the clipped,
    accumulated gradient of the fast module equals the one from Opacus' module."""
    ref, fast = both(*CASES[case], batch=5, seed=1)
    g = torch.Generator().manual_seed(4)
    masks = [torch.rand(p.shape, generator=g) < 0.6 for p in ref.parameters()]
    sums = []
    for module in (ref, fast):
        opt = MaskedDPOptimizer(torch.optim.SGD(module.parameters(), lr=0.1),
                                trainable=masks, noise_multiplier=0.0, max_grad_norm=0.5,
                                expected_batch_size=5, loss_reduction="mean")
        opt.keep = opt.select()
        opt.clip_and_accumulate()
        sums.append([p.summed_grad for p in opt.params])
    for a, b in zip(*sums, strict=True):
        torch.testing.assert_close(b, a, atol=TOL, rtol=TOL)


def test_accumulation_across_backward_passes_stacks_like_opacus() -> None:
    """Two backward passes without zero_grad: a list of per-sample gradients (chunks)."""
    torch.manual_seed(0)
    model = cnn_mnist(num_classes=10, image_shape=(1, 28, 28))
    ref = GradSampleModule(copy.deepcopy(model))
    fast = FastGradSampleModule(copy.deepcopy(model))
    chunks = [(torch.randn(3, 1, 28, 28), torch.randint(0, 10, (3,))) for _ in range(2)]
    for m in (ref, fast):
        for x, y in chunks:
            nn.functional.cross_entropy(m(x), y).backward()
    for pr, pf in zip(ref.parameters(), fast.parameters(), strict=True):
        assert isinstance(pf.grad_sample, list) and len(pf.grad_sample) == 2
        for a, b in zip(pr.grad_sample, pf.grad_sample, strict=True):
            torch.testing.assert_close(b, a, atol=TOL, rtol=TOL)


def test_hooks_off_eval_and_public_gradients_use_the_plain_model() -> None:
    """disable_hooks (public-gradient selection) gives ordinary autograd gradients; eval
    and no_grad forwards record nothing; parameters still require grad afterwards."""
    torch.manual_seed(0)
    fast = FastGradSampleModule(cnn_mnist(num_classes=10, image_shape=(1, 28, 28)))
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    fast.disable_hooks()
    params = list(fast.parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(fast(x), y), params)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    fast.enable_hooks()
    with torch.no_grad():
        fast(x)
    assert all(p.grad_sample is None and p.requires_grad for p in params)


def test_unsupported_layers_fall_back_to_opacus() -> None:
    """A layer only functorch handles (PReLU) keeps Opacus' module; a convolution with
    string padding or reflection padding takes Opacus' conv sampler on the fast module."""
    assert not fast_path(nn.Conv2d(2, 4, 3, padding="same"))
    assert not fast_path(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"))
    assert not supported(nn.Sequential(nn.PReLU(), nn.Linear(2, 2)))
    assert type(wrap_model(nn.Sequential(nn.PReLU(), nn.Linear(2, 2)))) is GradSampleModule
    assert type(wrap_model(cnn_mnist(num_classes=10, image_shape=(1, 28, 28)))) \
        is FastGradSampleModule


# --- factored linear layers (OuterProducts) and one-pass clipping ----------------------

def factored_and_opacus(build, shape, batch: int, seed: int):
    """The model wrapped for training (linear weights factored) and Opacus' module."""
    torch.manual_seed(seed)
    model = build()
    ref = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="mean")
    fast = wrap_model(copy.deepcopy(model))
    assert isinstance(fast, FastGradSampleModule) and fast.factored_linear
    return ref, fast


def opacus_clipped_sums(ref: GradSampleModule, masks, max_grad_norm: float,
                        chunks) -> list[torch.Tensor]:
    """Opacus' own clip-and-accumulate on its per-sample gradients, zeroed off the masks,
    over the chunks of one logical batch."""
    opt = DPOptimizer(torch.optim.SGD(ref.parameters(), lr=0.1), noise_multiplier=0.0,
                      max_grad_norm=max_grad_norm, expected_batch_size=5)
    return accumulate(opt, ref, chunks, masks)


def accumulate(opt: DPOptimizer, module: nn.Module, chunks, masks=None) -> list[torch.Tensor]:
    """Clip and accumulate every chunk of one logical batch through Opacus' skip-step
    protocol (a skipped ``step`` per chunk but the last); the summed clipped gradients.
    ``masks`` zero Opacus' per-sample gradients by hand; a MaskedDPOptimizer selects its
    keep-mask on the first chunk's step (by hand for a single chunk)."""
    for i, (x, y) in enumerate(chunks):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(module(x), y).backward()
        for p, keep in zip(opt.params, masks or [None] * len(opt.params), strict=True):
            if keep is not None:
                p.grad_sample = p.grad_sample * keep
        if i < len(chunks) - 1:
            opt.signal_skip_step(do_skip=True)
            assert not opt.step()
        else:
            if len(chunks) == 1 and isinstance(opt, MaskedDPOptimizer):
                opt.keep = opt.select()
            opt.clip_and_accumulate()
    return [p.summed_grad for p in opt.params]


def chunks_of(shape, sizes, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g), torch.randint(0, 5, (n,), generator=g))
            for n in sizes]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("sizes", [(5,), (3, 2)])
def test_factored_clipped_sum_equals_opacus(case: str, masked: bool, sizes) -> None:
    """Ghost norms and factored sums: the clipped (masked) sum equals Opacus' clipped sum of
    its own per-sample gradients, whole or in physical chunks, with a small clipping bound
    (every sample clipped) and a large one (none)."""
    build, shape = CASES[case]
    chunks = chunks_of(shape, sizes, seed=2)
    for bound in (0.05, 1e4):
        ref, fast = factored_and_opacus(build, shape, batch=5, seed=1)
        g = torch.Generator().manual_seed(4)
        masks = [torch.rand(p.shape, generator=g) < 0.6 if masked else None
                 for p in ref.parameters()]
        expected = opacus_clipped_sums(ref, masks, bound, chunks)
        opt = MaskedDPOptimizer(torch.optim.SGD(fast.parameters(), lr=0.1),
                                trainable=masks if masked else None, noise_multiplier=0.0,
                                max_grad_norm=bound, expected_batch_size=5)
        for a, b in zip(expected, accumulate(opt, fast, chunks), strict=True):
            torch.testing.assert_close(b, a, atol=TOL, rtol=TOL)


def test_factored_clipped_sum_with_dropping_equals_opacus() -> None:
    """Dropping (a fresh random keep-mask on top of pruning masks) on the factored path."""
    from trainables.dropping import RandomSelector

    build, shape = CASES["cnn-mnist"]
    chunks = chunks_of(shape, (4, 3), seed=3)
    ref, fast = factored_and_opacus(build, shape, batch=7, seed=0)
    g = torch.Generator().manual_seed(1)
    pruned = [torch.rand(p.shape, generator=g) < 0.5 if p.dim() > 1 else None
              for p in ref.parameters()]
    selector = RandomSelector(0.8, generator=torch.Generator().manual_seed(9))
    opt = MaskedDPOptimizer(torch.optim.SGD(fast.parameters(), lr=0.1), trainable=pruned,
                            selector=selector, noise_multiplier=0.0, max_grad_norm=0.1,
                            expected_batch_size=7)
    got = accumulate(opt, fast, chunks)
    assert all(k is not None for k in opt.keep)
    expected = opacus_clipped_sums(ref, opt.keep, 0.1, chunks)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, atol=TOL, rtol=TOL)


def test_outer_products_match_their_dense_form() -> None:
    """OuterProducts: dense tensor, (masked) squared norms, weighted sums; lists of passes
    concatenate; Opacus' materialised per-sample gradients through ``grad_samples``."""
    g = torch.Generator().manual_seed(0)
    grads, acts = torch.randn(6, 4, generator=g), torch.randn(6, 9, generator=g)
    mask = torch.rand(4, 9, generator=g) < 0.5
    w = torch.rand(6, generator=g)
    for op in (OuterProducts(grads, acts), OuterProducts(grads, acts).masked(mask)):
        full = torch.einsum("ni,nj->nij", grads, acts)
        full = full if op.mask is None else full * mask
        assert op.shape == full.shape and len(op) == 6
        torch.testing.assert_close(op.dense(), full)
        torch.testing.assert_close(op.sq_norms(), full.flatten(1).square().sum(1))
        torch.testing.assert_close(op.weighted_sum(w), torch.einsum("n,nij->ij", w, full))
        halves = [OuterProducts(grads[:2], acts[:2], op.mask),
                  OuterProducts(grads[2:], acts[2:], op.mask)]
        assert isinstance(flatten(halves), OuterProducts)
        torch.testing.assert_close(dense(halves), full)


def test_grad_samples_materialise_and_used_gradients_are_refused() -> None:
    """``grad_samples`` gives Opacus' tensors (factors materialised) equal to Opacus' own;
    a second step without zero_grad is refused as Opacus refuses it; an empty batch is a
    zero clipped sum."""
    build, shape = CASES["cnn-mnist"]
    ref, fast = factored_and_opacus(build, shape, batch=4, seed=0)
    x, y = chunks_of(shape, (4,), seed=0)[0]
    for m in (ref, fast):
        nn.functional.cross_entropy(m(x), y).backward()
    opt = MaskedDPOptimizer(torch.optim.SGD(fast.parameters(), lr=0.1), noise_multiplier=1.0,
                            max_grad_norm=1.0, expected_batch_size=4)
    assert len(opt.grad_samples) == len(opt.params) and opt.accumulated_iterations == 1
    for a, p in zip(opt.grad_samples, ref.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad_sample, atol=TOL, rtol=TOL)
    opt.step()
    with pytest.raises(ValueError, match="zero_grad"):
        opt.step()
    opt.zero_grad(set_to_none=True)
    for p in opt.params:
        p.grad_sample = torch.zeros((0, *p.shape))
    opt.clip_and_accumulate()
    assert all(p.summed_grad.shape == p.shape and not p.summed_grad.any()
               for p in opt.params)


def assert_equal_to_opacus(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Per-sample gradients of ``model`` on (x, y): this module's equal Opacus' own."""
    ref = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="mean")
    fast = FastGradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="mean")
    for m in (ref, fast):
        nn.functional.cross_entropy(m(x), y).backward()
    for pr, pf in zip(ref.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(pf.grad_sample, pr.grad_sample, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("channels", [1, 3])
def test_input_layer_convolutions_equal_opacus(channels: int) -> None:
    """Few input channels (the channel-as-batch path): strides, padding, dilation, bias,
    and output sizes that leave input rows unused."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(channels, 4, (3, 4), stride=(2, 3), padding=(1, 2), dilation=(2, 1)),
        nn.Tanh(), nn.Conv2d(4, 3, 2, bias=False), nn.Flatten(), nn.LazyLinear(5))
    x, y = torch.randn(6, channels, 11, 10), torch.randint(0, 5, (6,))
    model(x)  # materialise the lazy layer
    assert_equal_to_opacus(model, x, y)


@pytest.mark.parametrize(("channels", "size", "path"), [
    (64, 7, "unfold"),  # 7x7 outputs, 64x3x3 patches
    (64, 12, "group"),  # 12x12 outputs: too many positions
    (8, 7, "group"),  # 8x3x3 patches: too narrow
])
def test_inner_convolutions_equal_opacus_on_both_paths(channels: int, size: int, path: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An inner convolution (more than FEW_CHANNELS inputs) takes the unfolded matrix product
    for few output positions and wide patches, else the grouped convolution: both equal
    Opacus, with strides, padding, dilation and bias."""
    import trainables.grad_sample as grad_sample

    used: list[str] = []

    def spy(name: str, method):
        def call(*args):
            used.append(name)
            return method(*args)
        return call

    for name in ("conv_weight_by_unfold", "conv_weight_by_group"):
        monkeypatch.setattr(grad_sample, name, spy(name, getattr(grad_sample, name)))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(channels, 4, 3, stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
        nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(4, channels, size, 2 * size), torch.randint(0, 3, (4,))
    assert model[0](x).shape[2:] == (size, size)
    model(x)  # materialise the lazy layer
    assert_equal_to_opacus(model, x, y)
    assert used == [f"conv_weight_by_{path}"]
