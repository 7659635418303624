"""Image classifiers that Opacus can train, plus parameter and FLOP counts.

- ``cnn-mnist``: the small tanh CNN used for DP MNIST by Papernot et al. (2021) and
  Tramer & Boneh (2021): conv 16@8x8 s2, maxpool, conv 32@4x4 s2, maxpool, fc 32, fc C
  (about 26k parameters at width 1).
- ``cnn-cifar10``: its CIFAR-10 counterpart (Tramer & Boneh): three blocks of two 3x3
  convolutions (32, 64, 128 channels) with max pooling, fc 128, fc C.
- ``resnet18``: torchvision's ResNet-18 with BatchNorm replaced by GroupNorm through
  ``opacus.validators.ModuleValidator.fix`` (BatchNorm mixes samples, which DP-SGD forbids).

The CNNs are plain ``nn.Sequential`` chains with a width multiplier, which is what lets
:mod:`trainables.pruning` remove whole channels and build a physically smaller network.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import nn

from trainables.config import ModelConfig

log = logging.getLogger(__name__)


def _width(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def cnn_mnist(*, num_classes: int, image_shape: tuple[int, int, int],
              width: float = 1.0) -> nn.Sequential:
    """Papernot et al.'s DP MNIST CNN (tanh activations), scaled by ``width``."""
    c1, c2, fc = _width(16, width), _width(32, width), _width(32, width)
    features = nn.Sequential(
        nn.Conv2d(image_shape[0], c1, 8, stride=2, padding=3), nn.Tanh(),
        nn.MaxPool2d(2, 1),
        nn.Conv2d(c1, c2, 4, stride=2), nn.Tanh(),
        nn.MaxPool2d(2, 1),
        nn.Flatten(),
    )
    flat = _flat_features(features, image_shape)
    return nn.Sequential(*features, nn.Linear(flat, fc), nn.Tanh(), nn.Linear(fc, num_classes))


def cnn_cifar10(*, num_classes: int, image_shape: tuple[int, int, int],
                width: float = 1.0) -> nn.Sequential:
    """Tramer & Boneh's CIFAR-10 CNN (tanh activations), scaled by ``width``."""
    layers: list[nn.Module] = []
    in_ch = image_shape[0]
    for base in (32, 64, 128):
        out = _width(base, width)
        layers += [nn.Conv2d(in_ch, out, 3, padding=1), nn.Tanh(),
                   nn.Conv2d(out, out, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2, 2)]
        in_ch = out
    layers.append(nn.Flatten())
    features = nn.Sequential(*layers)
    flat = _flat_features(features, image_shape)
    fc = _width(128, width)
    return nn.Sequential(*features, nn.Linear(flat, fc), nn.Tanh(), nn.Linear(fc, num_classes))


def resnet18(*, num_classes: int, image_shape: tuple[int, int, int],
             width: float = 1.0) -> nn.Module:
    """ResNet-18 with GroupNorm (Opacus-compatible); small inputs get a 3x3 stem."""
    from opacus.validators import ModuleValidator
    from torchvision.models import resnet18 as tv_resnet18
    from torchvision.models.resnet import BasicBlock

    if width != 1.0:
        raise ValueError(f"model.width: resnet18 supports only width 1.0 (got {width!r})")
    model = tv_resnet18(weights=None, num_classes=num_classes)
    if image_shape[1] <= 64:  # CIFAR-style stem for small images
        model.conv1 = nn.Conv2d(image_shape[0], 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif image_shape[0] != 3:
        model.conv1 = nn.Conv2d(image_shape[0], 64, 7, stride=2, padding=3, bias=False)
    model = ModuleValidator.fix(model)
    for module in model.modules():  # Opacus' backward hooks forbid in-place ops on outputs
        if isinstance(module, nn.ReLU):
            module.inplace = False
        if isinstance(module, BasicBlock):
            module.__class__ = _out_of_place_basic_block()
    return model


@functools.cache
def _out_of_place_basic_block() -> type[nn.Module]:
    """torchvision's ``BasicBlock`` (same parameter names) without ``out += identity``;
    made on first use, so that only ResNets import torchvision (seconds per trial process)."""
    from torchvision.models.resnet import BasicBlock

    class OutOfPlaceBasicBlock(BasicBlock):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    return OutOfPlaceBasicBlock


ModelBuilder = Callable[..., nn.Module]
MODELS: dict[str, ModelBuilder] = {
    "cnn-mnist": cnn_mnist,
    "cnn-cifar10": cnn_cifar10,
    "resnet18": resnet18,
}


def build_model(config: ModelConfig, *, num_classes: int,
                image_shape: tuple[int, int, int]) -> nn.Module:
    """Build the configured model; load ``config.weights`` (a local state dict) if given."""
    model = MODELS[config.name](num_classes=num_classes, image_shape=image_shape,
                                width=config.width)
    if config.weights:
        load_weights(model, config.weights)
    return model


def load_weights(model: nn.Module, path: str) -> list[str]:
    """Load a local state dict for fine-tuning; tensors whose shape differs (a new
    classifier head, say) keep their fresh initialisation. Returns the skipped names."""
    import os

    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"model.weights: file not found (got {path!r})")
    state = torch.load(full, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(usable))
    if not usable:
        raise ValueError(f"model.weights: no tensor in {path!r} matches the model's "
                         f"parameter names and shapes")
    model.load_state_dict(usable, strict=False)
    if skipped:
        log.info("model.weights: kept fresh initialisation for %s", ", ".join(skipped))
    return skipped


def _flat_features(features: nn.Module, image_shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *image_shape)).shape[1])


def count_params(model: nn.Module) -> int:
    """Number of parameters (all of them, trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Forward FLOPs for one image (2 x multiply-accumulates of conv and linear layers)."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        kernel = module.weight[0].numel()  # (in / groups) * kh * kw
        total += 2 * kernel * out[0].numel()

    def linear_hook(module: nn.Linear, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * module.in_features * module.out_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *image_shape))
    model.train(was_training)
    for handle in handles:
        handle.remove()
    return total
