"""Gradient dropping (parameter selection): which trainable coordinates a step updates.

Before every DP-SGD step a :class:`Selector` picks, among the coordinates pre-pruning
left trainable, the fraction ``1 - rate`` that this step may update.
:class:`trainables.optimizer.MaskedDPOptimizer` then masks per-sample gradients to those
coordinates *before* clipping, adds noise only there, and leaves every other coordinate
(and its optimizer state) untouched.

Privacy: a selector may read the current weights (themselves the output of the DP
mechanism, so reading them is post-processing), fresh randomness, or *public* data. It
never reads private examples or their gradients, so selection costs no privacy budget
and the accountant need not know about it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainables.config import DroppingConfig

if TYPE_CHECKING:
    from trainables.data import Split

Masks = list[torch.Tensor | None]  # per parameter: bool keep-mask, or None for "all"


class Selector(ABC):
    """Chooses the coordinates each step updates, given what is trainable."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    @abstractmethod
    def select(self, params: list[nn.Parameter], trainable: Masks) -> list[torch.Tensor]:
        """Bool keep-masks, one per parameter, a subset of ``trainable``."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint beyond the generator (none by default; the generator a
        selector draws from belongs to the trial, which checkpoints it portably)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore :meth:`state_dict` (nothing to restore by default)."""


class RandomSelector(Selector):
    """Keeps each trainable coordinate with probability ``1 - rate``, fresh every step."""

    def __init__(self, rate: float, *, generator: torch.Generator) -> None:
        super().__init__(rate)
        self.generator = generator

    def select(self, params: list[nn.Parameter], trainable: Masks) -> list[torch.Tensor]:
        masks = []
        for p, t in zip(params, trainable, strict=True):
            keep = torch.rand(p.shape, generator=self.generator, device=self.generator.device)
            keep = keep.ge(self.rate).to(p.device)
            masks.append(keep if t is None else keep & t)
        return masks


class TopScoreSelector(Selector):
    """Keeps, per parameter tensor, the ``1 - rate`` trainable coordinates scoring highest."""

    def scores(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """One score per coordinate (higher = more worth updating)."""
        raise NotImplementedError

    def select(self, params: list[nn.Parameter], trainable: Masks) -> list[torch.Tensor]:
        counts = self._kept_counts(params, trainable)
        return [top_scores(s, k, t) for s, k, t in
                zip(self.scores(params), counts, trainable, strict=True)]

    def _kept_counts(self, params: list[nn.Parameter], trainable: Masks) -> list[int]:
        """Coordinates kept per tensor: fixed for a trial, so counted (synced) only once."""
        key = [id(t) for t in trainable]
        if getattr(self, "_counts_key", None) != key:
            self._counts_key = key
            self._counts = [round((1.0 - self.rate) * (p.numel() if t is None else
                                                       int(t.sum())))
                            for p, t in zip(params, trainable, strict=True)]
        return self._counts


class MagnitudeSelector(TopScoreSelector):
    """Largest |w| among the trainable coordinates, recomputed every step."""

    def scores(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        return [p.detach().abs() for p in params]


class PublicGradientSelector(TopScoreSelector):
    """Largest |gradient| on a fresh batch of *public* data, every step."""

    def __init__(self, rate: float, *, model: nn.Module, public: Split,
                 generator: torch.Generator, batch_size: int = 256) -> None:
        super().__init__(rate)
        self.model, self.public, self.generator = model, public, generator
        self.batch_size = min(batch_size, len(public))

    def scores(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        idx = torch.randperm(len(self.public), generator=self.generator,
                             device=self.generator.device)[: self.batch_size]
        device = params[0].device
        idx = idx.to(self.public.labels.device)  # a no-op when data and generator share it
        x, y = self.public.images[idx].to(device), self.public.labels[idx].to(device)
        disable = getattr(self.model, "disable_hooks", None)  # Opacus GradSampleModule
        if disable:
            disable()
        try:
            loss = nn.functional.cross_entropy(self.model(x), y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            if disable:
                self.model.enable_hooks()
        return [torch.zeros_like(p) if g is None else g.abs()
                for p, g in zip(params, grads, strict=True)]


def top_scores(scores: torch.Tensor, k: int, trainable: torch.Tensor | None) -> torch.Tensor:
    """Mask of the ``k`` highest scores among the trainable coordinates.

    No host synchronisation: untrainable scores are pushed to -inf with ``torch.where``
    (not a boolean-mask assignment) and ``topk`` need not sort its result."""
    flat = scores.flatten()
    if trainable is not None:
        flat = torch.where(trainable.flatten(), flat, -float("inf"))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        keep.index_fill_(0, torch.topk(flat, k, sorted=False).indices, True)
    return keep.view_as(scores)


def make_selector(config: DroppingConfig, *, model: nn.Module, public: Split | None,
                  generator: torch.Generator) -> Selector | None:
    """The configured selector, or ``None`` when nothing is dropped."""
    if config.rate == 0.0:
        return None
    if config.criterion == "random":
        return RandomSelector(config.rate, generator=generator)
    if config.criterion == "magnitude":
        return MagnitudeSelector(config.rate)
    if config.criterion == "public-grad":
        if public is None:
            raise ValueError("dropping.criterion: public-grad needs dataset.public")
        return PublicGradientSelector(config.rate, model=model, public=public,
                                      generator=generator)
    raise ValueError(f"dropping.criterion: unknown criterion (got {config.criterion!r})")
