"""Models: Opacus-compatible, loadable weights, FLOP counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from trainables.config import ModelConfig
from trainables.models import build_model, count_flops, count_params
from trainables.optimizer import MaskedDPOptimizer


@pytest.mark.parametrize("name,shape", [("cnn-mnist", (1, 28, 28)),
                                        ("cnn-cifar10", (3, 32, 32)),
                                        ("resnet18", (3, 32, 32))])
def test_one_dp_step_through_each_model(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), num_classes=10, image_shape=shape)
    assert ModuleValidator.validate(model, strict=False) == []
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = MaskedDPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=1.0,
                            max_grad_norm=1.0, expected_batch_size=4)
    before = [p.detach().clone() for p in gsm.parameters()]
    loss = torch.nn.functional.cross_entropy(gsm(torch.randn(4, *shape)), torch.arange(4))
    loss.backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, gsm.parameters(), strict=True))


def test_width_multiplier_scales_the_cnns() -> None:
    small = build_model(ModelConfig(name="cnn-cifar10", width=0.5), num_classes=10,
                        image_shape=(3, 32, 32))
    big = build_model(ModelConfig(name="cnn-cifar10", width=2.0), num_classes=10,
                      image_shape=(3, 32, 32))
    assert count_params(big) > 10 * count_params(small)
    assert count_flops(big, (3, 32, 32)) > 10 * count_flops(small, (3, 32, 32))


def test_flops_of_the_mnist_cnn_by_hand() -> None:
    model = build_model(ModelConfig(name="cnn-mnist"), num_classes=10, image_shape=(1, 28, 28))
    expected = 2 * (16 * 64 * 14 * 14 + 32 * 16 * 16 * 5 * 5 + 512 * 32 + 32 * 10)
    assert count_flops(model, (1, 28, 28)) == expected


def test_weights_load_for_fine_tuning_with_a_new_head(tmp_path: Path) -> None:
    torch.manual_seed(1)
    donor = build_model(ModelConfig(name="cnn-mnist"), num_classes=5, image_shape=(1, 28, 28))
    path = tmp_path / "public.pt"
    torch.save(donor.state_dict(), path)
    torch.manual_seed(2)
    model = build_model(ModelConfig(name="cnn-mnist", weights=str(path)), num_classes=10,
                        image_shape=(1, 28, 28))
    torch.testing.assert_close(model[0].weight, donor[0].weight)
    assert model[-1].weight.shape == (10, 32)  # new head, fresh initialisation


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.weights"):
        build_model(ModelConfig(name="cnn-mnist", weights=str(tmp_path / "none.pt")),
                    num_classes=10, image_shape=(1, 28, 28))
