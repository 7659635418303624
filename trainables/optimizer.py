"""DP-SGD over a subset of coordinates: Opacus' ``DPOptimizer`` with masks.

:class:`MaskedDPOptimizer` keeps Opacus' pipeline (clip per sample -> accumulate -> add
noise -> scale -> step) and changes three steps:

1. ``clip_and_accumulate``: per-sample gradients are multiplied by this step's keep-mask
   *before* their norms are taken, so clipping sees only the coordinates being trained;
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

from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from torch.optim import Optimizer

from trainables.dropping import Masks, Selector


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

    def clip_and_accumulate(self) -> None:
        """Mask per-sample gradients to the kept coordinates, then clip and sum them (into
        ``p.summed_grad``, accumulating across calls as Opacus does between steps)."""
        self.mask_grad_samples()
        super().clip_and_accumulate()

    @torch.no_grad()
    def mask_grad_samples(self) -> None:
        """Zero, in place, the per-sample gradients of coordinates not kept this step."""
        for p, keep in zip(self.params, self.keep, strict=True):
            if keep is None or p.grad_sample is None:
                continue
            samples = p.grad_sample if isinstance(p.grad_sample, list) else [p.grad_sample]
            for g in samples:
                g.mul_(keep)  # a bool mask multiplies without a float copy of it

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
