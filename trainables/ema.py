"""Parameter averaging: an exponential moving average (EMA) of the weights (De et al. 2022).

With ``optim.ema_decay: d`` the trial keeps, next to the trained weights w, an average
a <- d_t * a + (1 - d_t) * w, updated after every DP step, with the usual warm-up
d_t = min(d, (1 + t) / (10 + t)) at step t so that early averages are not dominated by
the initialisation. The average is computed from the released iterates only, so it is
post-processing: it costs no privacy budget. Validation, test, selection, the DP
validation score, the audit and ``dpstudy release`` use the averaged weights; checkpoints
carry the average and its step counter, so a resumed trial continues it exactly. Pruned
weights start at 0 and are never updated, so their average stays 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class ParameterAverage:
    """The EMA of a module's floating-point parameters and buffers."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.steps = 0
        self.average = {name: t.detach().clone() for name, t in _tensors(module)}

    def current_decay(self) -> float:
        """The decay of the next update (warm-up: ``min(decay, (1 + t) / (10 + t))``)."""
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold the module's current weights into the average (one DP step)."""
        decay = self.current_decay()
        for name, t in _tensors(module):
            self.average[name].lerp_(t.detach(), 1.0 - decay)
        self.steps += 1

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Within the block, the module holds the averaged weights (the trained ones are
        put back afterwards, also on error)."""
        saved = {name: t.detach().clone() for name, t in _tensors(module)}
        _copy_into(module, self.average)
        try:
            yield
        finally:
            _copy_into(module, saved)

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: the averaged tensors (on the CPU) and the step counter."""
        return {"decay": self.decay, "steps": self.steps,
                "average": {k: v.cpu() for k, v in self.average.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors go to the device of the current average)."""
        if set(state["average"]) != set(self.average):
            raise ValueError(f"parameter average for {sorted(state['average'])}, but this "
                             f"model has {sorted(self.average)}")
        self.steps = int(state["steps"])
        self.average = {k: state["average"][k].to(v.device, v.dtype)
                        for k, v in self.average.items()}


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in module.state_dict(keep_vars=True).items():
        if torch.is_floating_point(t):
            yield name, t


@torch.no_grad()
def _copy_into(module: nn.Module, values: dict[str, torch.Tensor]) -> None:
    for name, t in _tensors(module):
        t.copy_(values[name])


def averaged_state(module: nn.Module, average: ParameterAverage | None) -> dict[str, Any]:
    """The module's state dict with the averaged weights in place (the trained weights'
    state dict when there is no average): what a release publishes."""
    state = module.state_dict()
    if average is None:
        return state
    return {k: average.average[k].cpu() if k in average.average else v for k, v in
            state.items()}
