"""DP validation scores: a Gaussian mechanism on the count of correct predictions.

A trial that selects on a *private* validation split releases a score that is itself DP:
``(correct + N(0, noise^2)) / m``. For a fixed model, adding or removing one example changes
the count of correct predictions by at most 1 (sensitivity 1 under add/remove-one, the
relation of DP-SGD's Poisson accounting; the model was already released by DP-SGD, so this
composes adaptively). The denominator ``m`` is public: the split's *nominal* size
(:func:`trainables.data.nominal_validation_size`, fixed by the dataset's size and the
config), never the size of the split drawn, which one added example changes too (dividing
by it would make the score more than post-processing of the noised count). Its cost is
one Gaussian mechanism of noise multiplier ``noise``: in
Opacus' accountants the history entry ``(noise, sample_rate=1.0, steps=1)``
(:func:`trainables.accounting.release_entry`), so it is part of the trial's
``epsilon_spent``.

The noise comes from the operating system's entropy (:func:`release_rng`), never from the
trial's seed: nothing written out (seed, checkpoint) lets anyone subtract it.
"""

from __future__ import annotations

import secrets

import numpy as np
from opacus.accountants import IAccountant

from trainables.accounting import release_entry


def release_rng() -> np.random.Generator:
    """A generator seeded from OS entropy that is never recorded."""
    return np.random.default_rng(secrets.randbits(128))


def noisy_count(correct: int, noise: float, rng: np.random.Generator) -> float:
    """The Gaussian mechanism on a count of sensitivity 1: ``correct + N(0, noise^2)``."""
    if noise <= 0:
        raise ValueError(f"validation_noise: must be > 0 (got {noise!r})")
    return float(correct) + float(rng.normal(0.0, noise))


def dp_accuracy(correct: int, denominator: int, noise: float, accountant: IAccountant,
                rng: np.random.Generator | None = None) -> float:
    """Release a DP accuracy (noisy count / ``denominator``, a public constant: the split's
    nominal size; post-processing) and charge its cost to ``accountant``."""
    if not denominator or denominator <= 0:
        raise ValueError(f"validation: the DP score needs the split's public nominal size "
                         f"(got {denominator!r})")
    score = noisy_count(correct, noise, rng or release_rng()) / denominator
    accountant.history.append(release_entry(noise))
    return score
