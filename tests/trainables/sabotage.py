"""Test-only broken mechanisms: MaskedDPOptimizer subclasses, each breaking one small step.

They exist so the audit's tests (and ``benchmarks/audit.py``) can show that the audit
catches a broken mechanism that the accountant would never notice. Production code never
imports this module.
"""

from __future__ import annotations

from opacus.optimizers import DPOptimizer

from trainables.optimizer import MaskedDPOptimizer


class NoNoise(MaskedDPOptimizer):
    """Noise turned off (the accountant still counts sigma)."""

    noise_scale = 0.0

    def add_noise(self) -> None:
        """Add noise at ``noise_scale`` times the planned standard deviation."""
        planned = self.noise_multiplier
        self.noise_multiplier = planned * self.noise_scale
        try:
            super().add_noise()
        finally:
            self.noise_multiplier = planned


class TenthNoise(NoNoise):
    """Noise scaled by 0.1."""

    noise_scale = 0.1


class NoClipping(MaskedDPOptimizer):
    """Per-sample gradients masked but never clipped (noise still scaled to C)."""

    def clip_and_accumulate(self) -> None:
        """Accumulate masked per-sample gradients with an infinite clipping bound."""
        bound = self.max_grad_norm
        self.max_grad_norm = float("inf")
        try:
            super().clip_and_accumulate()
        finally:
            self.max_grad_norm = bound


class NoiseOnDropped(MaskedDPOptimizer):
    """Noise added before masking with the mask's polarity wrong: it lands only on the
    coordinates dropped this step (which the step then discards), none on kept ones."""

    def add_noise(self) -> None:
        """Noise everywhere, then kept coordinates reset to their noiseless clipped sum."""
        DPOptimizer.add_noise(self)
        for p, keep in zip(self.params, self.keep, strict=True):
            clean = p.summed_grad.view_as(p)
            p.grad = clean.clone() if keep is None else p.grad.where(~keep, clean)


SABOTAGES = {"no-noise": NoNoise, "noise-x0.1": TenthNoise, "no-clipping": NoClipping,
             "noise-on-dropped": NoiseOnDropped}
