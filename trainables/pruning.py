"""Pre-pruning (parameter freezing): fix, before DP training, which weights are removed.

Two granularities:

- ``unstructured``: a boolean mask per conv/linear weight. Pruned weights are set to 0
  here; :class:`trainables.optimizer.MaskedDPOptimizer` keeps them out of clipping, noise
  and the update, so they stay exactly 0 for the whole trial.
- ``structured``: whole output channels (conv) or neurons (linear) are removed from a
  chain model (``nn.Sequential``), and a physically smaller network is built, which is
  what makes the pruned model faster to train.

Criteria: ``random``; ``magnitude`` of the initial (or loaded) weights; ``snip``
(connection sensitivity |w * dL/dw|, Lee et al. 2019) on a batch of *public* data only.
None of them reads private data, so pre-pruning costs no privacy budget.

Masks are our own tensors, not ``torch.nn.utils.prune`` (whose extra buffers and forward
pre-hooks Opacus rejects).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainables.config import PruningConfig
from trainables.models import count_params

if TYPE_CHECKING:
    from trainables.data import Split

SNIP_BATCH = 256


@dataclass
class PruneResult:
    """The model to train, its masks (unstructured only) and how much of it is left."""

    model: nn.Module
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0

    @property
    def density(self) -> float:
        """Fraction of the unpruned model's parameters that remain trainable."""
        return self.params_after / self.params_before if self.params_before else 1.0


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights pruning acts on: those of every conv and linear layer (not biases)."""
    return {f"{name}.weight" if name else "weight": module.weight
            for name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear))}


def prune(model: nn.Module, config: PruningConfig, *, public: Split | None = None,
          generator: torch.Generator | None = None) -> PruneResult:
    """Pre-prune ``model`` as configured (a no-op at rate 0)."""
    before = count_params(model)
    if config.rate == 0.0:
        return PruneResult(model=model, params_before=before, params_after=before)
    if config.granularity == "structured":
        smaller = prune_structured(model, config, public=public, generator=generator)
        return PruneResult(model=smaller, params_before=before,
                           params_after=count_params(smaller))
    masks = unstructured_masks(model, config, public=public, generator=generator)
    apply_masks(model, masks)
    removed = sum(int((~m).sum()) for m in masks.values())
    return PruneResult(model=model, masks=masks, params_before=before,
                       params_after=before - removed)


# --- scores -------------------------------------------------------------------------

def weight_scores(model: nn.Module, criterion: str, *, public: Split | None,
                  generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """A score per prunable weight: the lowest-scored weights are pruned first."""
    weights = prunable_weights(model)
    if criterion == "random":
        return {n: torch.rand(w.shape, generator=generator).to(w.device)
                for n, w in weights.items()}
    if criterion == "magnitude":
        return {n: w.detach().abs() for n, w in weights.items()}
    if criterion == "snip":
        grads = _public_gradients(model, public, weights)
        return {n: (w.detach() * grads[n]).abs() for n, w in weights.items()}
    raise ValueError(f"pruning.criterion: unknown criterion (got {criterion!r})")


def _public_gradients(model: nn.Module, public: Split | None,
                      weights: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    if public is None or len(public) == 0:
        raise ValueError("pruning.criterion: snip needs public data (dataset.public)")
    device = next(model.parameters()).device
    x = public.images[:SNIP_BATCH].to(device)
    y = public.labels[:SNIP_BATCH].to(device)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: w.grad.detach().clone() for n, w in weights.items()}
    model.zero_grad(set_to_none=True)
    return grads


# --- unstructured -------------------------------------------------------------------

def unstructured_masks(model: nn.Module, config: PruningConfig, *,
                       public: Split | None = None,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Boolean keep-masks removing ``config.rate`` of the weights, globally or per layer."""
    scores = weight_scores(model, config.criterion, public=public, generator=generator)
    if config.scope == "layerwise":
        return {n: _keep_top(s, config.rate) for n, s in scores.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = _keep_top(flat, config.rate)
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start:start + s.numel()].view_as(s)
        start += s.numel()
    return masks


def _keep_top(scores: torch.Tensor, rate: float) -> torch.Tensor:
    """Mask keeping all but the ``round(rate * n)`` lowest scores (exact count)."""
    flat = scores.flatten()
    drop = round(rate * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    if drop > 0:
        keep[torch.topk(flat, drop, largest=False).indices] = False
    return keep.view_as(scores)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device, params[name].dtype))


# --- structured ---------------------------------------------------------------------

def prune_structured(model: nn.Module, config: PruningConfig, *,
                     public: Split | None = None,
                     generator: torch.Generator | None = None) -> nn.Sequential:
    """A copy of a chain model without the lowest-scored output channels / neurons.

    Every conv/linear layer but the last (the classifier) loses units; the layer that
    consumes them loses the matching input columns (through a ``Flatten`` too).
    """
    layers = _chain_layers(model)
    scores = weight_scores(model, config.criterion, public=public, generator=generator)
    names = list(prunable_weights(model))
    unit_scores = [scores[names[i]].flatten(1).sum(1) for i in range(len(layers) - 1)]
    keeps = _choose_units(unit_scores, config.rate, config.scope)
    smaller = copy.deepcopy(model)
    sm_layers = _chain_layers(smaller)
    for i, keep in enumerate(keeps):
        _slice_outputs(sm_layers[i], keep)
        _slice_inputs(sm_layers[i + 1], keep, layers[i].weight.shape[0])
    return smaller


def _chain_layers(model: nn.Module) -> list[nn.Conv2d | nn.Linear]:
    if not isinstance(model, nn.Sequential):
        raise ValueError("pruning.granularity: structured pruning needs a chain model "
                         f"(cnn-mnist, cnn-cifar10) (got {type(model).__name__})")
    return [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]


def _choose_units(unit_scores: list[torch.Tensor], rate: float,
                  scope: str) -> list[torch.Tensor]:
    """Sorted indices of the units each layer keeps (at least one per layer)."""
    if scope == "layerwise":
        keep_masks = [_keep_top(s, rate) for s in unit_scores]
    else:  # global: normalise so layers of different scale compete fairly
        normed = [s / s.mean().clamp_min(1e-12) for s in unit_scores]
        flat = _keep_top(torch.cat(normed), rate)
        keep_masks = list(flat.split([s.numel() for s in unit_scores]))
    out = []
    for mask, s in zip(keep_masks, unit_scores, strict=True):
        if not mask.any():
            mask = s == s.max()
        out.append(mask.nonzero().flatten())
    return out


@torch.no_grad()
def _slice_outputs(layer: nn.Conv2d | nn.Linear, keep: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight[keep].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias[keep].clone())
    if isinstance(layer, nn.Conv2d):
        layer.out_channels = len(keep)
    else:
        layer.out_features = len(keep)


@torch.no_grad()
def _slice_inputs(layer: nn.Conv2d | nn.Linear, keep: torch.Tensor, units: int) -> None:
    if isinstance(layer, nn.Conv2d):
        layer.weight = nn.Parameter(layer.weight[:, keep].clone())
        layer.in_channels = len(keep)
        return
    per_unit = layer.in_features // units  # spatial positions per channel after Flatten
    cols = (keep[:, None] * per_unit + torch.arange(per_unit)).flatten()
    layer.weight = nn.Parameter(layer.weight[:, cols].clone())
    layer.in_features = len(cols)
