"""Canaries for a one-run privacy audit (Steinke, Nasr & Jagielski 2023).

An audit inserts ``m`` canaries, each *included* in training independently with probability
1/2, trains once, scores every canary, and asks how well the scores tell included from
excluded canaries (:mod:`trainables.audit` turns that into an epsilon lower bound).

Two kinds of canaries, one class each:

- :class:`DiracCanaries` (white-box): canary ``i`` is a per-sample gradient that is zero
  except on one trainable coordinate, where it is ``norm_multiple * C``. Every step each
  included canary joins the batch with the Poisson rate ``q`` of real examples, as one more
  row of the per-sample gradients, *before* the optimizer masks, clips, sums, noises and
  drops them: it takes exactly the path of a real example. A sound optimizer clips it to
  norm ``C``; one that skips clipping lets ``norm_multiple * C`` through. The score is the
  coordinate's total update ``theta_0 - theta_T`` (the canary pushes the weight down).
  Canary coordinates are drawn among the coordinates pre-pruning left trainable. With
  gradient dropping a canary's coordinate is trained only on the steps that keep it, so
  its signal and its noise both shrink, to a fraction ``1 - drop_rate`` of the steps.

  The real examples' per-sample gradients are zeroed on the ``m`` canary coordinates
  (``isolate=True``): DP must hold for *any* other data, including data whose gradients
  vanish there, so this is a legitimate choice of the adversary (gradient-space auditing),
  and it removes the drift of real gradients from the scores, which on mnist-5k is larger
  than the canary's own signal.
- :class:`MislabeledCanaries` (black-box): ``m`` training images with a wrong label,
  removed from the training data and put back only if included. The score is minus the
  final model's loss on the canary (with its wrong label): what an adversary who sees only
  the released model can measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainables.clipping import dense
from trainables.data import Split
from trainables.dropping import Masks


def draw_inclusion(m: int, generator: torch.Generator) -> torch.Tensor:
    """``m`` independent fair coins: which canaries are included in training."""
    return torch.rand(m, generator=generator) < 0.5


@dataclass(frozen=True)
class Coordinate:
    """One weight: parameter index and flat index within that parameter."""

    param: int
    index: int


def trainable_coordinates(params: list[torch.Tensor], trainable: Masks, m: int,
                          generator: torch.Generator) -> list[Coordinate]:
    """``m`` distinct coordinates drawn uniformly among the trainable ones."""
    sizes = [int(p.numel()) if t is None else int(t.sum())
             for p, t in zip(params, trainable, strict=True)]
    total = sum(sizes)
    if m > total:
        raise ValueError(f"audit.canaries: at most one canary per trainable weight "
                         f"({total} after pruning) (got {m})")
    picks = torch.randperm(total, generator=generator)[:m].sort().values.tolist()
    flat = []
    for i, (p, t) in enumerate(zip(params, trainable, strict=True)):
        idx = torch.arange(p.numel()) if t is None else t.flatten().cpu().nonzero().flatten()
        flat.append((i, idx))
    out, offset, it = [], 0, iter(flat)
    param, idx = next(it)
    for pick in picks:
        while pick >= offset + len(idx):
            offset += len(idx)
            param, idx = next(it)
        out.append(Coordinate(param, int(idx[pick - offset])))
    return out


class DiracCanaries:
    """White-box gradient canaries, one per coordinate; see the module docstring."""

    def __init__(self, params: list[torch.Tensor], trainable: Masks, *, count: int,
                 sample_rate: float, clip_norm: float, generator: torch.Generator,
                 norm_multiple: float = 10.0, isolate: bool = True) -> None:
        self.coordinates = trainable_coordinates(params, trainable, count, generator)
        self.included = draw_inclusion(count, generator)
        self.sample_rate = sample_rate
        self.value = norm_multiple * clip_norm
        self.isolate = isolate
        self.generator = generator
        self.initial = self._values(params)

    def _values(self, params: list[torch.Tensor]) -> torch.Tensor:
        return torch.tensor([float(params[c.param].detach().flatten()[c.index])
                             for c in self.coordinates], dtype=torch.float64)

    def inject(self, params: list[torch.Tensor]) -> None:
        """Append this step's sampled canaries as per-sample gradient rows (and isolate)."""
        draw = torch.rand(len(self.coordinates), generator=self.generator) < self.sample_rate
        chosen = (draw & self.included).nonzero().flatten().tolist()
        for i, p in enumerate(params):
            rows = torch.zeros((len(chosen), p.numel()), dtype=p.dtype, device=p.device)
            for row, k in enumerate(chosen):
                if self.coordinates[k].param == i:
                    rows[row, self.coordinates[k].index] = self.value
            _append_rows(p, rows.view(len(chosen), *p.shape), self._own(i) if self.isolate
                         else [])

    def _own(self, param: int) -> list[int]:
        return [c.index for c in self.coordinates if c.param == param]

    def scores(self, params: list[torch.Tensor]) -> np.ndarray:
        """Total update of each canary coordinate, signed so that included ones score high."""
        return (self.initial - self._values(params)).numpy()


def _append_rows(p: torch.Tensor, rows: torch.Tensor, isolated: list[int]) -> None:
    """Add canary rows to ``p.grad_sample`` (tensor, or the last tensor of a list)."""
    gs = p.grad_sample
    last = gs[-1] if isinstance(gs, list) else gs
    last = None if last is None else dense(last)  # factored rows materialised
    if last is None:
        last = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    if isolated:
        last = last.clone(memory_format=torch.contiguous_format)
        last.view(len(last), -1)[:, isolated] = 0
    merged = torch.cat([last, rows.to(last.dtype)], dim=0)
    if isinstance(gs, list):
        gs[-1] = merged
    else:
        p.grad_sample = merged


class MislabeledCanaries:
    """Black-box input canaries: mislabeled training images; see the module docstring."""

    def __init__(self, train: Split, *, count: int, num_classes: int,
                 generator: torch.Generator) -> None:
        if count >= len(train):
            raise ValueError(f"audit.canaries: black-box canaries are taken from the "
                             f"{len(train)} training images, so must be fewer (got {count})")
        order = torch.randperm(len(train), generator=generator)
        self.index, self.rest = order[:count], order[count:]
        shift = torch.randint(1, num_classes, (count,), generator=generator)
        self.images = train.images[self.index]
        self.labels = (train.labels[self.index] + shift) % num_classes
        self.included = draw_inclusion(count, generator)
        self.train = train

    def training_split(self) -> Split:
        """The real images minus all canaries, plus the included canaries (relabelled)."""
        keep = self.included.nonzero().flatten()
        images = torch.cat([self.train.images[self.rest], self.images[keep]])
        labels = torch.cat([self.train.labels[self.rest], self.labels[keep]])
        return Split(images=images, labels=labels)

    @torch.no_grad()
    def scores(self, model: torch.nn.Module, device: torch.device,
               batch_size: int = 1024) -> np.ndarray:
        """Minus the final model's loss on each canary (its wrong label)."""
        model.eval()
        out = []
        for start in range(0, len(self.labels), batch_size):
            x = self.images[start:start + batch_size].to(device)
            y = self.labels[start:start + batch_size].to(device)
            loss = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
            out.append(-loss.double().cpu())
        model.train()
        return torch.cat(out).numpy()
