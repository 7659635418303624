"""Mixed precision on GPU: ``precision: bf16``.

The forward pass (and with it the backward pass of each op) runs under CUDA autocast in
bfloat16, which halves activation memory and uses the GPU's bf16 tensor cores. What the DP
guarantee rests on stays in float32: Opacus computes per-sample gradients in its backward
hooks from the stored activations and the backpropagated gradients; both are cast to
float32 first (:class:`Float32GradSampleModule`), so per-sample gradients, their norms,
the clipping, the sum and the Gaussian noise (drawn in the parameters' float32) are all
float32. The parameters themselves stay float32 (autocast casts copies), so the optimizer
step is float32 too. Evaluation (validation, test, the DP score) runs in float32. bf16
needs CUDA: on a CPU it is a configuration error.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from opacus import GradSampleModule
from torch import nn

from trainables import grad_sample


class Float32GradSampleModule(GradSampleModule):
    """``GradSampleModule`` whose per-sample gradients are computed in float32 whatever
    dtype autocast ran the layer in."""

    def rearrange_grad_samples(self, *, module: nn.Module, backprops: torch.Tensor,
                               loss_reduction: str, batch_first: bool) -> Any:
        """Opacus' rearrangement, on float32 backprops and activations."""
        activations, backprops = super().rearrange_grad_samples(
            module=module, backprops=backprops.float(), loss_reduction=loss_reduction,
            batch_first=batch_first)
        activations = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a
                       for a in activations]
        return activations, backprops


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse bf16 on anything but a CUDA device (names the field and the device)."""
    if precision == "bf16" and device.type != "cuda":
        raise ValueError(f"precision: bf16 needs a CUDA device (the trial runs on "
                         f"{device}) (got 'bf16')")


def wrap_model(module: nn.Module, precision: str) -> GradSampleModule:
    """The per-sample-gradient wrapper of ``module`` for ``precision``: for fp32 the fast
    module of :func:`trainables.grad_sample.wrap_model` (Opacus' own where a layer needs
    functorch); for bf16 Opacus' hooks with float32 per-sample gradients."""
    if precision == "bf16":
        return Float32GradSampleModule(module, batch_first=True, loss_reduction="mean")
    return grad_sample.wrap_model(module)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of the forward pass (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
