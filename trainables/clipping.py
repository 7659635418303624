"""Per-sample clipping in one pass, with outer-product (ghost) norms for linear layers.

DP-SGD clips each example's gradient to norm ``max_grad_norm`` over *all* parameters and
sums the clipped gradients. Opacus does it from materialised per-sample gradients
``p.grad_sample`` of shape ``(n, *p.shape)``: one pass for the norms, one for the
weighted sum. This module does the same with two savings:

1. a linear layer on a 2-D input has rank-one per-sample weight gradients
   ``g_i a_i^T`` (output gradient ``g_i``, input ``a_i``). :class:`OuterProducts` keeps
   the factors instead of the ``(n, out, in)`` tensor (the "book-keeping" / ghost-norm
   trick of Bu et al.; Rochette et al.): with keep-mask ``M`` the squared norm of the
   masked gradient is ``sum_jk M_jk g_ij^2 a_ik^2 = ((g_i^2)^T M) . a_i^2`` (without a
   mask ``|g_i|^2 |a_i|^2``) and the clipped sum is ``M * ((c g)^T a)``;
2. a materialised per-sample gradient is read as an ``(n, P)`` matrix: its squared norms
   are one reduction and its clipped sum one matrix-vector product with the clip factors.

The clip factors are Opacus' (``max_grad_norm / (norm + 1e-6)``, at most 1), from the
norm over every parameter's kept coordinates. :func:`dense` turns any stored form back
into Opacus' per-sample gradient tensor, for code that needs one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Opacus' guard against division by zero in the clip factor
#: (``opacus.optimizers.DPOptimizer.clip_and_accumulate``)
NORM_EPS = 1e-6


@dataclass
class OuterProducts:
    """Per-sample gradients of a linear weight, sample ``i``'s being
    ``mask * outer(grads[i], acts[i])``, kept as factors."""

    grads: torch.Tensor  # (n, out): gradient of the layer's output, per sample
    acts: torch.Tensor  # (n, in): the layer's input, per sample
    mask: torch.Tensor | None = None  # bool (out, in): kept coordinates (None: all)

    def __len__(self) -> int:
        return self.grads.shape[0]

    @property
    def shape(self) -> torch.Size:
        """The shape of the materialised tensor, ``(n, out, in)``."""
        return torch.Size((len(self), self.grads.shape[1], self.acts.shape[1]))

    def masked(self, keep: torch.Tensor) -> OuterProducts:
        """The same gradients restricted to ``keep`` (on top of any mask already set)."""
        mask = keep if self.mask is None else self.mask & keep
        return OuterProducts(self.grads, self.acts, mask)

    def dense(self) -> torch.Tensor:
        """The ``(n, out, in)`` per-sample gradient tensor."""
        out = self.grads.unsqueeze(2) * self.acts.unsqueeze(1)
        return out if self.mask is None else out.mul_(self.mask)

    def sq_norms(self) -> torch.Tensor:
        """Each sample's squared gradient norm over the kept coordinates, shape ``(n,)``."""
        g2, a2 = self.grads.square(), self.acts.square()
        if self.mask is None:
            return g2.sum(1) * a2.sum(1)
        return (g2 @ self.mask.to(g2.dtype)).mul_(a2).sum(1)

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """``sum_i weights[i] * gradient_i``, shape ``(out, in)``."""
        out = (self.grads * weights.unsqueeze(1)).T @ self.acts
        return out if self.mask is None else out.mul_(self.mask)


GradSample = torch.Tensor | OuterProducts  # one backward pass's per-sample gradients


def flatten(samples: GradSample | list[GradSample]) -> GradSample:
    """One pass's worth of per-sample gradients from several (a list, as Opacus
    accumulates them across backward passes): factors stay factors when every pass has
    them with the same mask, anything else is concatenated densely."""
    if not isinstance(samples, list):
        return samples
    if all(isinstance(s, OuterProducts) for s in samples) and \
            len({id(s.mask) for s in samples}) == 1:
        return OuterProducts(torch.cat([s.grads for s in samples]),
                             torch.cat([s.acts for s in samples]), samples[0].mask)
    return torch.cat([dense(s) for s in samples])


def dense(samples: GradSample | list[GradSample]) -> torch.Tensor:
    """Opacus' per-sample gradient tensor ``(n, *p.shape)`` of any stored form."""
    flat = flatten(samples)
    return flat.dense() if isinstance(flat, OuterProducts) else flat


def sq_norms(samples: GradSample) -> torch.Tensor:
    """Squared per-sample norms, shape ``(n,)`` (a dense tensor is already masked)."""
    if isinstance(samples, OuterProducts):
        return samples.sq_norms()
    return torch.linalg.vector_norm(rows(samples), dim=1).square()


def clip_factors(samples: list[GradSample], max_grad_norm: float) -> torch.Tensor:
    """Opacus' per-sample clip factors from the norm over all parameters, ``(n,)``."""
    total = torch.stack([sq_norms(s) for s in samples]).sum(0)
    return (max_grad_norm / (total.sqrt() + NORM_EPS)).clamp(max=1.0)


def clipped_sum(samples: GradSample, factors: torch.Tensor,
                shape: torch.Size) -> torch.Tensor:
    """``sum_i factors[i] * gradient_i`` reshaped to the parameter's ``shape``."""
    if isinstance(samples, OuterProducts):
        return samples.weighted_sum(factors).view(shape)
    return (factors @ rows(samples)).view(shape)


def rows(samples: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients as an ``(n, P)`` matrix (a view when contiguous; n may be 0)."""
    return samples.reshape(samples.shape[0], math.prod(samples.shape[1:]))
