"""The one table of a study's hyperparameters: name (in the spec and the results), place in
the trial config (``section.key``), and where each is shown. Every part of the service that
lists hyperparameters reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter of a trial.

    ``searched``: a numeric parameter of the spec's ``search:`` (fixed, range or choices);
    ``criterion``: a criterion string a spec section may search as a list;
    ``reported``: a column of the report's tables and figures (and of a release);
    ``summarised``: shown in the line that ends ``dpstudy run``;
    ``recorded``: copied from the trial config into its ``trials.parquet`` row."""

    name: str
    section: str
    key: str
    doc: str
    searched: bool = False
    criterion: bool = False
    reported: bool = False
    summarised: bool = False
    recorded: bool = True


_SHOWN = {"searched": True, "reported": True, "summarised": True}

HYPERPARAMETERS: tuple[Hyperparameter, ...] = (
    Hyperparameter("prune_rate", "pruning", "rate", "fraction of weights pre-pruned",
                   **_SHOWN),
    Hyperparameter("drop_rate", "dropping", "rate",
                   "fraction of the remaining coordinates not updated each step", **_SHOWN),
    Hyperparameter("clip_norm", "optim", "clip_norm", "per-sample gradient clipping bound",
                   **_SHOWN),
    Hyperparameter("noise_multiplier", "privacy", "noise_multiplier",
                   "Gaussian noise std divided by clip_norm", **_SHOWN),
    Hyperparameter("learning_rate", "optim", "learning_rate", "optimizer step size",
                   **_SHOWN),
    Hyperparameter("batch_size", "optim", "batch_size",
                   "expected logical (Poisson) batch size", searched=True, reported=True),
    Hyperparameter("max_epochs", "optim", "max_epochs",
                   "epoch cap (the budget decides the epochs trained)", searched=True,
                   recorded=False),
    Hyperparameter("epochs", "privacy", "epochs",
                   "epochs the noise is calibrated for (instead of a noise range)",
                   searched=True, recorded=False),
    Hyperparameter("augmentation_multiplicity", "optim", "augmentation_multiplicity",
                   "augmented views per example, gradients averaged before clipping",
                   searched=True, reported=True),
    Hyperparameter("ema_decay", "optim", "ema_decay",
                   "decay of the parameter average evaluated and released (null: off)",
                   searched=True, reported=True),
    Hyperparameter("pruning_criterion", "pruning", "criterion",
                   "random | magnitude | snip", criterion=True),
    Hyperparameter("pruning_scope", "pruning", "scope", "global | layerwise",
                   criterion=True),
    Hyperparameter("pruning_granularity", "pruning", "granularity",
                   "unstructured | structured", criterion=True),
    Hyperparameter("dropping_criterion", "dropping", "criterion",
                   "random | magnitude | public-grad", criterion=True),
)

def names(**flags: bool) -> tuple[str, ...]:
    """Names of the hyperparameters whose flags are all as given, in table order:
    ``names(searched=True)`` is the spec's numeric search space."""
    return tuple(h.name for h in HYPERPARAMETERS
                 if all(getattr(h, flag) == want for flag, want in flags.items()))


def recorded_values(config: dict[str, Any]) -> dict[str, Any]:
    """The ``trials.parquet`` hyperparameter columns of one trial config dict (None when
    absent)."""
    return {h.name: (config.get(h.section) or {}).get(h.key)
            for h in HYPERPARAMETERS if h.recorded}
