"""DP-SGD over a subset of coordinates: Opacus' ``DPOptimizer`` with masks.

:class:`MaskedDPOptimizer` keeps Opacus' pipeline (clip per sample -> accumulate -> add
noise -> scale -> step) and changes three steps:

1. ``clip_and_accumulate``: per-sample gradients are multiplied by this step's keep-mask
   *before* their norms are taken, so clipping sees only the coordinates being trained;
   norms and clipped sums come from :mod:`trainables.clipping` in one pass, from the
   factors where a linear layer kept them (Opacus' clip factors, global per-sample norm);
2. ``add_noise``: Gaussian noise lands only on kept coordinates;
3. ``step``: coordinates not kept this step (pruned or dropped) keep their value and their
   optimizer state (momentum, Adam moments) exactly; pruned weights therefore stay 0. With
   plain SGD (no momentum, no weight decay) a zero gradient is no update, so the step is a
   masked update (gradient zeroed off the mask); a stateful or decaying optimizer steps,
   then frozen coordinates and their state are restored from a snapshot.

The keep-mask is ``trainable & selected``: ``trainable`` comes from pre-pruning, fixed for
the trial; ``selected`` from a :class:`trainables.dropping.Selector`, fresh each step
(once per logical batch: the chunks of a physical-batch split share it).
Neither reads private data, so the privacy analysis is the one of plain DP-SGD with the
same noise multiplier, clipping norm and sampling rate: the sensitivity of the clipped sum
is still at most ``max_grad_norm``, and the accountant is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.optim import Optimizer

from trainables import clipping
from trainables.clipping import OuterProducts
from trainables.dropping import Masks, Selector

#: the attribute Opacus marks used gradients with (it refuses to use them twice)
PROCESSED = "_processed"


class MaskedDPOptimizer(DPOptimizer):
    """``DPOptimizer`` that trains, each step, only ``trainable & selected`` coordinates."""

    def __init__(self, optimizer: Optimizer, *, trainable: Masks | None = None,
                 selector: Selector | None = None, **dp_kwargs: Any) -> None:
        super().__init__(optimizer, **dp_kwargs)
        self.selector = selector
        self.set_trainable(trainable)

    def set_trainable(self, trainable: Masks | None) -> None:
        """Fix the pre-pruning masks (one per parameter, None = all trainable)."""
        masks = list(trainable) if trainable else [None] * len(self.params)
        if len(masks) != len(self.params):
            raise ValueError(f"trainable: one mask per parameter needed "
                             f"(got {len(masks)} for {len(self.params)})")
        self.trainable: Masks = [None if t is None else t.to(p.device, torch.bool)
                                 for p, t in zip(self.params, masks, strict=True)]
        self.keep: Masks = self.trainable
        self.trainable_count = sum(p.numel() if t is None else int(t.sum())
                                   for p, t in zip(self.params, self.trainable, strict=True))
        #: coordinates kept at the last step, a 0-dim tensor on the parameters' device
        #: (summed without a host synchronisation; read :attr:`kept_fraction` to get a float)
        self._all_kept = torch.tensor(float(self.trainable_count), device=self.params[0].device)
        self.kept_count = self._all_kept

    # -- the three changed steps of the DP pipeline -----------------------------------

    def select(self) -> Masks:
        """This step's keep-masks: trainable coordinates, narrowed by the selector."""
        if self.selector is None:
            return self.trainable
        return self.selector.select(self.params, self.trainable)

    @torch.no_grad()
    def clip_and_accumulate(self) -> None:
        """Mask per-sample gradients to the kept coordinates, then clip and sum them (into
        ``p.summed_grad``, accumulating across calls as Opacus does between steps): each
        sample's clip factor comes from its norm over every parameter's kept coordinates."""
        self.mask_grad_samples()
        params = self.params
        samples = [clipping.flatten(_fresh(p)) for p in params]
        factors = clipping.clip_factors(samples, self.max_grad_norm)
        for p, gs in zip(params, samples, strict=True):
            grad = clipping.clipped_sum(gs, factors.to(p.dtype), p.shape)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad.add_(grad)
            _mark_processed(p.grad_sample)

    @torch.no_grad()
    def mask_grad_samples(self) -> None:
        """Zero, in place, the per-sample gradients of coordinates not kept this step
        (factored ones carry the mask into their norms and sums)."""
        for p, keep in zip(self.params, self.keep, strict=True):
            if keep is None or p.grad_sample is None:
                continue
            if isinstance(p.grad_sample, list):
                p.grad_sample = [_masked(g, keep) for g in p.grad_sample]
            else:
                p.grad_sample = _masked(p.grad_sample, keep)

    @property
    def grad_samples(self) -> Sequence[torch.Tensor]:
        """Opacus' flat per-sample gradient per parameter, each materialised when read."""
        return DenseGradSamples(self.params)

    @property
    def accumulated_iterations(self) -> int:
        """Backward passes accumulated since the last step (Opacus' count, factors
        included)."""
        counts = {len(s) if isinstance(s, list) else 1
                  for s in (_grad_sample(p) for p in self.params)}
        if len(counts) > 1:
            raise ValueError("Number of accumulated steps is inconsistent across parameters")
        return counts.pop() if counts else 1

    def add_noise(self) -> None:
        """Add Gaussian noise (std = noise_multiplier * max_grad_norm) to kept coordinates."""
        super().add_noise()
        for p, keep in zip(self.params, self.keep, strict=True):
            if keep is not None:
                p.grad.mul_(keep)

    @property
    def starts_logical_batch(self) -> bool:
        """Whether the next :meth:`pre_step` begins a logical batch: False while chunks of
        one are being accumulated (Opacus' ``signal_skip_step`` protocol)."""
        return not self._is_last_step_skipped

    def pre_step(self, closure: Any = None) -> bool:
        """Choose the coordinates once per logical batch (on its first chunk), then run
        Opacus' clip/accumulate (per chunk) and noise/scale (per logical batch) steps."""
        if self.starts_logical_batch:
            self.keep = self.select()
            self.kept_count = self._kept_count()
        return super().pre_step(closure)

    def step(self, closure: Any = None) -> float | None:
        """One DP step that leaves coordinates not kept (and their state) untouched."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        if not self.pre_step():
            return None
        if self.zero_grad_is_no_update():  # a masked update: frozen gradients are 0
            self._zero_frozen_grads()
            return self.original_optimizer.step()
        frozen = self._snapshot_frozen()
        loss = self.original_optimizer.step()
        self._restore_frozen(frozen)
        return loss

    def zero_grad_is_no_update(self) -> bool:
        """Whether the base optimizer leaves a coordinate whose gradient is exactly 0
        exactly unchanged, with no state: plain SGD (no momentum, no weight decay). Then
        the masked gradient alone keeps frozen coordinates, with no snapshot to restore."""
        opt = self.original_optimizer
        return type(opt) is torch.optim.SGD and all(
            g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0
            for g in opt.param_groups)

    # -- helpers -----------------------------------------------------------------------

    @torch.no_grad()
    def _zero_frozen_grads(self) -> None:
        for p, keep in zip(self.params, self.keep, strict=True):
            if keep is not None and p.grad is not None:
                p.grad.masked_fill_(~keep, 0.0)

    @property
    def kept_fraction(self) -> float:
        """Fraction of the trainable coordinates kept at the last step (synchronises)."""
        return float(self.kept_count) / self.trainable_count if self.trainable_count else 1.0

    def _kept_count(self) -> torch.Tensor:
        if self.keep is self.trainable:
            return self._all_kept
        full = sum(p.numel() for p, keep in zip(self.params, self.keep, strict=True)
                   if keep is None)
        counts = [keep.sum() for keep in self.keep if keep is not None]
        return torch.stack(counts).sum().to(self.kept_count) + full

    def _snapshot_frozen(self) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]] | None]:
        snaps: list[tuple[torch.Tensor, dict[str, torch.Tensor]] | None] = []
        for p, keep in zip(self.params, self.keep, strict=True):
            if keep is None:
                snaps.append(None)
                continue
            state = self.original_optimizer.state.get(p, {})
            saved = {k: v.detach().clone() for k, v in state.items()
                     if torch.is_tensor(v) and v.shape == p.shape}
            snaps.append((p.detach().clone(), saved))
        return snaps

    @torch.no_grad()
    def _restore_frozen(self, snaps: list) -> None:
        for p, keep, snap in zip(self.params, self.keep, snaps, strict=True):
            if snap is None:
                continue
            value, saved = snap
            p.copy_(torch.where(keep, p, value))
            for key, tensor in self.original_optimizer.state.get(p, {}).items():
                if torch.is_tensor(tensor) and tensor.shape == p.shape:
                    before = saved.get(key, torch.zeros_like(tensor))
                    tensor.copy_(torch.where(keep, tensor, before))


class DenseGradSamples(Sequence[torch.Tensor]):
    """Each parameter's per-sample gradients as Opacus' flat tensor, built when indexed
    (Opacus reads only the length of the list where it merely checks for parameters)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [clipping.dense(_grad_sample(p)) for p in self.params[i]]
        return clipping.dense(_grad_sample(self.params[i]))


def _grad_sample(p: nn.Parameter) -> Any:
    """``p.grad_sample``; raises as Opacus does when it is missing."""
    samples = getattr(p, "grad_sample", None)
    if samples is None:
        raise ValueError("Per sample gradient is not initialized. Not updated in backward "
                         "pass?")
    return samples


def _fresh(p: nn.Parameter) -> Any:
    """``p.grad_sample``; raises as Opacus does when it is missing or already used."""
    samples = _grad_sample(p)
    for s in samples if isinstance(samples, list) else [samples]:
        if getattr(s, PROCESSED, False):
            raise ValueError("Gradients haven't been cleared since the last optimizer step. "
                             "In order to obtain privacy guarantees you must call "
                             "optimizer.zero_grad() on each step")
    return samples


def _mark_processed(samples: Any) -> None:
    for s in samples if isinstance(samples, list) else [samples]:
        setattr(s, PROCESSED, True)


def _masked(samples: clipping.GradSample, keep: torch.Tensor) -> clipping.GradSample:
    """Dense per-sample gradients zeroed in place off ``keep``; factors get the mask."""
    if isinstance(samples, OuterProducts):
        return samples.masked(keep)
    return samples.mul_(keep)  # a bool mask multiplies without a float copy of it
