"""Per-sample gradients without the summed gradient DP-SGD throws away.

Opacus' :class:`~opacus.GradSampleModule` lets autograd compute every parameter's summed
gradient (``p.grad``, which DP-SGD then discards and overwrites) and copies each per-sample
gradient into a zero-filled buffer. :class:`FastGradSampleModule` keeps its interface
(``_module``, ``enable_hooks``/``disable_hooks``, ``p.grad_sample`` for
:class:`~opacus.optimizers.DPOptimizer`) and changes how the gradients are obtained:

1. during a training forward pass the parameters do not require grad, so autograd builds a
   graph of activation gradients only: no weight gradient is ever computed, and the first
   layer computes no input gradient either;
2. each layer with parameters saves its input and hooks its output tensor; when the output
   gradient arrives, the layer's per-sample gradients are computed from (input, output
   gradient) and stored as ``p.grad_sample`` (a tensor; a list after accumulation across
   backward passes, as in Opacus).

Fast paths: ``nn.Linear``, ``nn.Conv2d`` (zero padding given as numbers) and
``nn.GroupNorm`` (the layers of ``cnn-mnist``, ``cnn-cifar10`` and ``resnet18``). Any other
layer with an Opacus grad sampler uses that sampler on the same (input, output gradient)
pair. A model with a layer Opacus can only handle through functorch falls back to Opacus'
own module (:func:`wrap_model`).

With ``factored_linear`` (what :func:`wrap_model` builds for training) a linear layer on a
2-D input stores its weight's per-sample gradients as
:class:`trainables.clipping.OuterProducts` (the output gradients and inputs, never the
``(n, out, in)`` tensor); :class:`trainables.optimizer.MaskedDPOptimizer` clips them from
the factors and :func:`trainables.clipping.dense` materialises them where needed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn

from trainables.clipping import GradSample, OuterProducts, dense

Samplers = dict[nn.Parameter, GradSample]


#: input channels up to which a convolution's per-sample weight gradients are computed
#: with the channels as the batch (:func:`conv_weight_by_channel`; image input layers)
FEW_CHANNELS = 3
#: A one-group convolution with at most FEW_POSITIONS output positions (``oh * ow``) and
#: patches of at least WIDE_PATCH values (``C * kh * kw``) gets its per-sample weight
#: gradients as one batched matrix product of the unfolded input
#: (:func:`conv_weight_by_unfold`): 1.7x to 2.8x faster than one convolution per sample
#: (:func:`conv_weight_by_group`) on a CPU for the width-4 CNN's second layer (5x5 outputs,
#: 64x4x4 patches) and ResNet-18's last two stages (8x8 and 4x4 outputs at 32x32 input);
#: the grouped convolution is faster for cnn-mnist's second layer (16x4x4 patches, 2x) and
#: for many output positions (ResNet's 16x16 and 32x32 stages, 2.5x to 6x).
FEW_POSITIONS = 64
WIDE_PATCH = 512


def conv2d_grad_sample(layer: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor) -> Samplers:
    """Per-sample weight/bias gradients of a 2-D convolution from its input and output
    gradient: :func:`conv_weight_by_channel` for an input layer (few channels, one group),
    :func:`conv_weight_by_unfold` for few output positions and wide patches (one group), else
    :func:`conv_weight_by_group`."""
    out: Samplers = {}
    if layer.weight.requires_grad:
        if layer.groups == 1 and layer.in_channels <= FEW_CHANNELS:
            weight = conv_weight_by_channel
        elif (layer.groups == 1 and grad.shape[2] * grad.shape[3] <= FEW_POSITIONS
              and math.prod(layer.weight.shape[1:]) >= WIDE_PATCH):
            weight = conv_weight_by_unfold
        else:
            weight = conv_weight_by_group
        out[layer.weight] = weight(layer, x, grad)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = grad.sum((2, 3))
    return out


def conv_weight_by_unfold(layer: nn.Conv2d, x: torch.Tensor,
                          grad: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients ``(n, O, C, kh, kw)`` of a one-group convolution: the
    output gradient ``(n, O, L)`` times the unfolded input ``(n, C kh kw, L)`` (im2col),
    one batched matrix product (Opacus' formula, without its einsum)."""
    n = x.shape[0]
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                    stride=layer.stride)
    return torch.bmm(grad.reshape(n, layer.out_channels, -1),
                     cols.transpose(1, 2)).view(n, *layer.weight.shape)


def conv_weight_by_group(layer: nn.Conv2d, x: torch.Tensor,
                         grad: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients ``(n, O, C / groups, kh, kw)``: one weight-gradient
    convolution with the batch folded into the groups (each sample its own group)."""
    n, c, o = x.shape[0], layer.in_channels, layer.out_channels
    shape = layer.weight.shape  # (O, C / groups, kh, kw)
    weight = x.new_empty((n * shape[0], *shape[1:]))  # only its shape is read
    _, gw, _ = torch.ops.aten.convolution_backward(
        grad.reshape(1, n * o, *grad.shape[2:]), x.reshape(1, n * c, *x.shape[2:]),
        weight, None, layer.stride, layer.padding, layer.dilation, False, (0, 0),
        n * layer.groups, (False, True, False))
    return gw.view(n, *shape)


def conv_weight_by_channel(layer: nn.Conv2d, x: torch.Tensor,
                           grad: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients ``(n, O, C, kh, kw)`` of a one-group convolution: a
    convolution of the padded input, with its C channels as the batch and its samples as
    the groups, by each sample's output gradient as the kernel (the layer's stride becomes
    the dilation, its dilation the stride). Fast where C is small (an input layer)."""
    n, o = x.shape[0], layer.out_channels
    kh, kw = layer.kernel_size
    (ph, pw), (oh, ow) = layer.padding, grad.shape[2:]
    padded = F.pad(x, (pw, pw, ph, ph)).transpose(0, 1)  # (C, n, H, W)
    gw = F.conv2d(padded, grad.reshape(n * o, 1, oh, ow), stride=layer.dilation,
                  dilation=layer.stride, groups=n)  # (C, n * O, >= kh, >= kw)
    gw = gw[:, :, :kh, :kw].reshape(layer.in_channels, n, o, kh, kw)
    return gw.permute(1, 2, 0, 3, 4).contiguous()


def linear_grad_sample(layer: nn.Linear, x: torch.Tensor, grad: torch.Tensor) -> Samplers:
    """Per-sample gradients of a linear layer: the outer product of output gradient and
    input (summed over any middle dimensions)."""
    out: Samplers = {}
    if x.dim() == 2:
        if layer.weight.requires_grad:
            out[layer.weight] = grad.unsqueeze(2) * x.unsqueeze(1)
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = grad
        return out
    n = x.shape[0]
    x3, g3 = x.reshape(n, -1, x.shape[-1]), grad.reshape(n, -1, grad.shape[-1])
    if layer.weight.requires_grad:
        out[layer.weight] = torch.bmm(g3.transpose(1, 2), x3)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g3.sum(1)
    return out


def group_norm_grad_sample(layer: nn.GroupNorm, x: torch.Tensor,
                           grad: torch.Tensor) -> Samplers:
    """Per-sample gradients of GroupNorm's affine parameters: the normalised input times
    the output gradient (weight), the output gradient (bias), summed over positions."""
    n, c = grad.shape[0], grad.shape[1]
    g = grad.reshape(n, c, -1)
    out: Samplers = {}
    if layer.weight is not None and layer.weight.requires_grad:
        normed = F.group_norm(x, layer.num_groups, eps=layer.eps).reshape(n, c, -1)
        out[layer.weight] = torch.einsum("ncl,ncl->nc", normed, g)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(2)
    return out


def linear_factors(layer: nn.Linear, x: torch.Tensor, grad: torch.Tensor) -> Samplers:
    """Per-sample gradients of a linear layer on a 2-D input, the weight's kept as
    factors (:class:`trainables.clipping.OuterProducts`)."""
    out: Samplers = {}
    if layer.weight.requires_grad:
        out[layer.weight] = OuterProducts(grad, x)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = grad.clone()  # masked in place later: must not alias the factor
    return out


FAST_SAMPLERS = {nn.Linear: linear_grad_sample, nn.Conv2d: conv2d_grad_sample,
                 nn.GroupNorm: group_norm_grad_sample}


def fast_path(module: nn.Module) -> bool:
    """Whether ``module``'s per-sample gradients take one of this module's fast paths."""
    if type(module) is nn.Conv2d:
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return type(module) in FAST_SAMPLERS


def _own_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def supported(model: nn.Module) -> bool:
    """True when every layer with trainable parameters has a fast path or an Opacus grad
    sampler taking (input, output gradient); False when one needs functorch."""
    return all(fast_path(m) or type(m) in GradSampleModule.GRAD_SAMPLERS
               for m in model.modules() if _own_params(m))


class FastGradSampleModule(GradSampleModule):
    """Opacus' ``GradSampleModule`` interface; per-sample gradients without ``p.grad``."""

    #: store a linear layer's per-sample weight gradients on 2-D inputs as factors
    factored_linear: bool = False

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        """Hook every layer that owns trainable parameters (see the module docstring)."""
        if not batch_first or force_functorch or loss_reduction not in ("mean", "sum"):
            raise ValueError("FastGradSampleModule: batch_first=True, force_functorch=False "
                             "and loss_reduction 'mean' or 'sum' are required")
        if not supported(self._module):
            raise ValueError("FastGradSampleModule: a layer needs functorch; "
                             "use opacus.GradSampleModule")
        self._pass = 0
        self._trainable = [p for p in self._module.parameters() if p.requires_grad]
        self.autograd_grad_sample_hooks = [
            module.register_forward_hook(self._capture)
            for module in self._module.modules() if _own_params(module)]
        self.enable_hooks()

    def remove_hooks(self) -> None:
        """Remove the forward hooks added by :meth:`add_hooks`."""
        self.disable_hooks()
        while getattr(self, "autograd_grad_sample_hooks", []):
            self.autograd_grad_sample_hooks.pop().remove()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward; while training with grad enabled and hooks on, the
        parameters do not require grad, so backward computes activation gradients only."""
        if not (self.hooks_enabled and self.training and torch.is_grad_enabled()):
            return self._module(*args, **kwargs)
        self._pass += 1
        for p in self._trainable:
            p.requires_grad_(False)
        try:
            return self._module(*args, **kwargs)
        finally:
            for p in self._trainable:
                p.requires_grad_(True)

    def _capture(self, module: nn.Module, inputs: tuple, output: Any) -> Any:
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled()):
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"FastGradSampleModule: {type(module).__name__} returned "
                            f"{type(output).__name__}, a tensor is needed")
        if not output.requires_grad:  # nothing upstream needs a gradient: a fresh leaf
            output = output.detach().requires_grad_(True)
        x = inputs[0].detach()
        pass_id = self._pass
        output.register_hook(lambda grad: self._per_sample(module, x, grad, pass_id))
        return output

    def _per_sample(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor,
                    pass_id: int) -> None:
        if not self.hooks_enabled:
            return
        grad = grad.detach()
        x = x.to(grad.dtype)  # under autocast the saved input may be wider (as Opacus does)
        own = _own_params(module)
        # a mean loss scales each sample's gradient by 1/n: undo it on the smaller side
        scale = x.shape[0] if self.loss_reduction == "mean" else 1
        late = scale != 1 and grad.numel() > x.shape[0] * sum(p.numel() for p in own)
        if scale != 1 and not late:
            grad = grad * scale
        if self.factored_linear and type(module) is nn.Linear and x.dim() == 2:
            samples = linear_factors(module, x, grad)
        elif fast_path(module):
            samples = FAST_SAMPLERS[type(module)](module, x, grad)
        else:
            samples = GradSampleModule.GRAD_SAMPLERS[type(module)](module, [x], grad)
        params = {id(p) for p in own}
        for p, gs in samples.items():
            if id(p) in params:
                _store(p, _scaled(gs, scale) if late else gs, pass_id)


def _scaled(gs: GradSample, scale: int) -> GradSample:
    """``gs`` times ``scale``, out of place (a sampler may return the output gradient)."""
    if isinstance(gs, OuterProducts):
        return OuterProducts(gs.grads * scale, gs.acts, gs.mask)
    return gs * scale


def _store(p: nn.Parameter, gs: torch.Tensor, pass_id: int) -> None:
    """``p.grad_sample`` as Opacus keeps it: summed within a backward pass (a layer used
    twice), stacked into a list across passes (gradient accumulation)."""
    if getattr(p, "_grad_sample_pass", None) == pass_id and p.grad_sample is not None:
        if isinstance(p.grad_sample, list):  # a layer used twice: factors are summed densely
            p.grad_sample[-1] = dense(p.grad_sample[-1]) + dense(gs)
        else:
            p.grad_sample = dense(p.grad_sample) + dense(gs)
        return
    p._grad_sample_pass = pass_id
    if p.grad_sample is None:
        p.grad_sample = gs
    elif isinstance(p.grad_sample, list):
        p.grad_sample.append(gs)
    else:
        p.grad_sample = [p.grad_sample, gs]


def wrap_model(model: nn.Module) -> GradSampleModule:
    """The fast module (linear weights' per-sample gradients as factors) where every layer
    is supported, else Opacus' own (batch first, mean loss reduction)."""
    if not supported(model):
        return GradSampleModule(model, batch_first=True, loss_reduction="mean")
    module = FastGradSampleModule(model, batch_first=True, loss_reduction="mean")
    module.factored_linear = True
    return module
