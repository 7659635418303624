"""Pre-pruning: exact rates, criteria, structured shrinking with fewer params and FLOPs."""

from __future__ import annotations

import pytest
import torch

from trainables.config import ModelConfig, PruningConfig
from trainables.data import Split
from trainables.models import build_model, count_flops, count_params
from trainables.pruning import prunable_weights, prune

SHAPE = (1, 28, 28)


def mnist_cnn(width: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="cnn-mnist", width=width), num_classes=10,
                       image_shape=SHAPE)


def public_split(n: int = 64) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(images=torch.randn(n, *SHAPE, generator=g),
                 labels=torch.randint(0, 10, (n,), generator=g))


def test_mnist_cnn_matches_the_papers_size() -> None:
    assert count_params(mnist_cnn()) == 26010
    assert count_params(mnist_cnn(width=2.0)) > 3 * 26010


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("criterion", ["random", "magnitude", "snip"])
def test_unstructured_prunes_exact_fraction_and_zeroes(scope: str, criterion: str) -> None:
    model = mnist_cnn()
    result = prune(model, PruningConfig(rate=0.7, criterion=criterion, scope=scope),
                   public=public_split(), generator=torch.Generator().manual_seed(0))
    weights = prunable_weights(result.model)
    total = sum(w.numel() for w in weights.values())
    removed = sum(int((~m).sum()) for m in result.masks.values())
    assert removed == pytest.approx(0.7 * total, abs=len(weights))
    for name, mask in result.masks.items():
        assert torch.all(weights[name][~mask] == 0)
        if scope == "layerwise":
            assert int((~mask).sum()) == round(0.7 * mask.numel())
    assert result.density == pytest.approx(1 - removed / result.params_before)


def test_magnitude_removes_the_smallest_weights() -> None:
    model = mnist_cnn()
    original = {n: w.detach().clone() for n, w in prunable_weights(model).items()}
    result = prune(model, PruningConfig(rate=0.5, criterion="magnitude", scope="global"))
    kept = torch.cat([original[n][m].abs() for n, m in result.masks.items()])
    dropped = torch.cat([original[n][~m].abs() for n, m in result.masks.items()])
    assert kept.min() >= dropped.max()


def test_snip_needs_public_data() -> None:
    with pytest.raises(ValueError, match="public"):
        prune(mnist_cnn(), PruningConfig(rate=0.5, criterion="snip"))


@pytest.mark.parametrize("rate", [0.5, 0.75])
@pytest.mark.parametrize("criterion", ["random", "magnitude"])
def test_structured_shrinks_params_and_flops(rate: float, criterion: str) -> None:
    model = mnist_cnn()
    flops_before = count_flops(model, SHAPE)
    result = prune(model, PruningConfig(rate=rate, criterion=criterion, scope="layerwise",
                                        granularity="structured"),
                   generator=torch.Generator().manual_seed(0))
    small = result.model
    assert result.params_after == count_params(small) < count_params(model)
    assert count_flops(small, SHAPE) < flops_before * (1 - rate) * 1.1
    assert result.density < (1 - rate) * 1.1
    assert not result.masks
    out = small(torch.randn(3, *SHAPE))
    assert out.shape == (3, 10)
    convs = [m for m in small if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == round(16 * (1 - rate))


def test_structured_keeps_the_surviving_units_weights() -> None:
    model = mnist_cnn()
    result = prune(model, PruningConfig(rate=0.5, criterion="magnitude", scope="layerwise",
                                        granularity="structured"))
    big, small = model[0].weight, result.model[0].weight
    norms = big.detach().flatten(1).abs().sum(dim=1)  # L1 of each unit
    keep = norms.topk(small.shape[0]).indices.sort().values
    torch.testing.assert_close(small.detach(), big.detach()[keep])


def test_structured_pruning_rejects_non_chain_models() -> None:
    torch.manual_seed(0)
    resnet = build_model(ModelConfig(name="resnet18"), num_classes=10, image_shape=(3, 32, 32))
    with pytest.raises(ValueError, match="chain model"):
        prune(resnet, PruningConfig(rate=0.5, granularity="structured"))
