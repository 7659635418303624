"""Data augmentation for augmentation multiplicity (De et al. 2022), defined in one place.

With ``optim.augmentation_multiplicity: K`` every example of a logical batch is seen as K
augmented views; :mod:`trainables.logical_batch` averages the K per-view gradients into
the example's per-sample gradient *before* it is masked and clipped, so each example still
contributes one clipped gradient and the privacy accounting is unchanged.

The augmentation is the dataset's (:func:`augmentation_for`):

============================== ==============================================================
dataset                        views
============================== ==============================================================
cifar10                        random crop of the image padded by 4 pixels (reflection
                               padding), then a horizontal flip with probability 1/2
mnist, mnist-5k, fashion-mnist random translation by up to 2 pixels in each direction
idx                            (reflection padding, then a crop back to the original
                               size); no flips: digits and letters are not mirror-symmetric
============================== ==============================================================

The random offsets and flips of a whole logical batch are drawn at once from the trial's
``augment`` generator (seeded from the spec seed, see :mod:`trainables.randomness`), so a
batch split into chunks sees exactly the views it sees in one pass, and a resumed trial
continues the same stream. The views are applied on the trial's device, to the normalised
images. Augmentation randomness needs no secrecy: the clipped, noised sum has sensitivity
``clip_norm`` whatever the views are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional

#: The augmentation of each dataset: (padding in pixels, horizontal flips).
AUGMENTATIONS: dict[str, tuple[int, bool]] = {
    "cifar10": (4, True), "mnist": (2, False), "mnist-5k": (2, False),
    "fashion-mnist": (2, False), "idx": (2, False)}


@dataclass(frozen=True)
class Views:
    """The random parameters of ``len(offsets)`` views: crop offsets and flips."""

    offsets: torch.Tensor  # (n, 2) int64: row and column offset into the padded image
    flips: torch.Tensor  # (n,) bool

    def __getitem__(self, part: slice) -> Views:
        return Views(self.offsets[part], self.flips[part])


@dataclass(frozen=True)
class Augmentation:
    """Random crop of the ``pad``-padded image back to its size, optionally flipped."""

    pad: int
    flip: bool

    def draw(self, n: int, generator: torch.Generator) -> Views:
        """The parameters of ``n`` views, drawn from ``generator`` (on its device)."""
        device = generator.device
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator,
                                device=device)
        flips = torch.rand(n, generator=generator, device=device) < 0.5
        return Views(offsets, flips if self.flip else torch.zeros_like(flips))

    def apply(self, images: torch.Tensor, views: Views) -> torch.Tensor:
        """``images`` (N, C, H, W) transformed by the N ``views``."""
        n, channels, height, width = images.shape
        if n == 0:
            return images
        padded = functional.pad(images, (self.pad,) * 4, mode="reflect")
        offsets = views.offsets.to(images.device)
        rows = offsets[:, 0, None] + torch.arange(height, device=images.device)
        cols = offsets[:, 1, None] + torch.arange(width, device=images.device)
        out = padded[torch.arange(n, device=images.device)[:, None, None, None],
                     torch.arange(channels, device=images.device)[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
        flips = views.flips.to(images.device)[:, None, None, None]
        return torch.where(flips, out.flip(-1), out) if self.flip else out


def augmentation_for(dataset: str) -> Augmentation:
    """The augmentation of ``dataset`` (see the module docstring)."""
    pad, flip = AUGMENTATIONS[dataset]
    return Augmentation(pad=pad, flip=flip)
