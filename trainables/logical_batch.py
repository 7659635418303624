"""One DP step over a logical (Poisson) batch, in physical chunks, with augmentation views.

The logical batch is what the privacy analysis samples: each training example is included
with probability q. Pushing it through the model at once needs memory for one per-sample
gradient per example and parameter, so with ``optim.physical_batch_size`` the batch is
processed in chunks of at most that many images per forward/backward pass. Each chunk
follows Opacus' accumulation protocol (the one ``BatchMemoryManager`` drives):

1. forward and backward on the chunk (its K augmentation views, see
   :mod:`trainables.augment`); Opacus' hooks leave one per-sample gradient per view;
2. with K > 1 the K views' gradients of each example are averaged into its per-sample
   gradient;
3. ``optimizer.signal_skip_step()`` for every chunk but the last, then
   ``optimizer.step()``: the optimizer masks, clips and adds the chunk's per-sample
   gradients to its running clipped sum (``p.summed_grad``), and for a skipped step stops
   there; the last chunk's step adds the noise once, scales by the expected logical batch
   size, calls the accountant once and updates the weights once.

The keep-mask of gradient dropping is chosen once per logical batch (on its first chunk,
:meth:`trainables.optimizer.MaskedDPOptimizer.starts_logical_batch`), so chunking changes
neither the masks, nor the noise, nor the accounting: up to float rounding of the sum, the
update equals the unchunked one. An empty Poisson draw is one empty chunk (a noise-only
step); a draw far larger than expected is simply more chunks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from trainables import precision
from trainables.augment import Augmentation, Views
from trainables.clipping import dense
from trainables.data import Split
from trainables.optimizer import MaskedDPOptimizer


@dataclass
class Batching:
    """How a logical batch is processed: chunk size, views and precision."""

    physical_batch_size: int | None  # images per pass (None: the whole batch at once)
    multiplicity: int  # augmentation views per example (1 = no augmentation)
    augmentation: Augmentation
    generator: torch.Generator  # draws the views
    precision: str
    device: torch.device

    def examples_per_pass(self, batch: int) -> int:
        """Examples per chunk: each brings ``multiplicity`` images into the pass."""
        if self.physical_batch_size is None:
            return max(batch, 1)
        return max(self.physical_batch_size // self.multiplicity, 1)


def logical_step(model: nn.Module, opt: MaskedDPOptimizer, train: Split, idx: torch.Tensor,
                 batching: Batching) -> torch.Tensor:
    """One DP step on the examples ``idx`` of ``train``; returns the summed loss (a 0-dim
    tensor on the device: the mean over views of each example's loss, summed)."""
    k = batching.multiplicity
    views = batching.augmentation.draw(len(idx) * k, batching.generator) if k > 1 else None
    per_pass = batching.examples_per_pass(len(idx))
    chunks = list(idx.split(per_pass)) if len(idx) else [idx]
    loss_sum = torch.zeros((), device=batching.device)
    start = 0
    for i, chunk in enumerate(chunks):
        opt.zero_grad(set_to_none=True)
        if len(chunk) == 0:  # an empty Poisson batch is still a (noise-only) step
            for p in opt.params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        else:
            part = None if views is None else views[start * k:(start + len(chunk)) * k]
            loss = chunk_backward(model, train, chunk, part, batching)
            loss_sum += loss.detach() * len(chunk)
            if k > 1:
                average_views(opt, k)
        start += len(chunk)
        if i < len(chunks) - 1:
            opt.signal_skip_step(do_skip=True)
        opt.step()
    return loss_sum


def chunk_backward(model: nn.Module, train: Split, chunk: torch.Tensor, views: Views | None,
                   batching: Batching) -> torch.Tensor:
    """Forward and backward on one chunk (its views when ``views`` is given); the mean
    loss over its images."""
    if batching.device.type == "cuda":
        chunk = chunk.pin_memory().to(batching.device, non_blocking=True)
    x, y = train.images[chunk], train.labels[chunk]
    if views is not None:
        k = batching.multiplicity
        x = batching.augmentation.apply(x.repeat_interleave(k, dim=0), views)
        y = y.repeat_interleave(k, dim=0)
    with precision.autocast(batching.precision, batching.device):
        loss = nn.functional.cross_entropy(model(x), y)
    with warnings.catch_warnings():  # Opacus' hooks on inputs without grad: harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()
    return loss


def average_views(opt: MaskedDPOptimizer, k: int) -> None:
    """Replace each parameter's per-view gradients (example-major, ``k`` views each) by
    their mean per example: one per-sample gradient per example, clipped as usual."""
    for p in opt.params:
        if p.grad_sample is None:
            continue
        g = dense(p.grad_sample)  # a mean of outer products is not one: materialise
        p.grad_sample = g.view(-1, k, *g.shape[1:]).mean(dim=1)
