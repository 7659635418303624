"""Empirical privacy audit of one trial's mechanism in one training run.

``run_audit(trial, audit)`` reads top to bottom:

1. check that the bound's library (``jax-privacy``, extra ``dpstudy[audit]``) is there,
   before any training;
2. build the trial exactly as :func:`trainables.train.build_run` does, with the optimizer
   class that injects canaries (:class:`CanaryDPOptimizer`, over an optional subclass of
   the optimizer under test);
3. insert the canaries (:mod:`trainables.canaries`): white-box gradient canaries or
   black-box mislabeled images, each included with probability 1/2;
4. train all planned steps; the claimed epsilon is the accountant's epsilon for them;
5. score the canaries and compute the lower bound with
   ``jax_privacy.auditing.CanaryScoreAuditor.epsilon_one_run`` (Steinke, Nasr & Jagielski
   2023). No statistics are written here.

The bound is a lower bound at the stated confidence: if the mechanism were
``(epsilon, delta)``-DP for some epsilon below it, scores this separable would occur with
probability at most ``1 - confidence``. A bound above the claimed epsilon means the
mechanism (or its accounting) is broken; a bound below it proves nothing about tightness.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from trainables.accounting import steps_per_epoch
from trainables.canaries import DiracCanaries, MislabeledCanaries
from trainables.config import ConfigError, TrialConfig
from trainables.errors import FailureError
from trainables.optimizer import MaskedDPOptimizer
from trainables.train import Run, build_run, evaluate, train_epoch

MODES = ("white-box", "black-box")
MISSING_EXTRA = ("dpstudy audit needs jax-privacy for its bound; install it with "
                 "pip install 'dpstudy[audit]'")


class AuditUnavailableError(FailureError, ImportError):
    """``jax-privacy`` (the ``dpstudy[audit]`` extra) is not installed."""


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """How to audit: number of canaries, confidence of the bound, canary kind."""

    section: ClassVar[str] = "audit"
    canaries: int = 1000
    confidence: float = 0.95
    mode: str = "white-box"
    seed: int = 0
    norm_multiple: float = 10.0

    def __post_init__(self) -> None:
        rules = [("canaries", _is_int(self.canaries) and self.canaries >= 2,
                  "must be an integer >= 2"),
                 ("confidence", _is_num(self.confidence) and 0 < self.confidence < 1,
                  "must be in (0, 1)"),
                 ("mode", self.mode in MODES, f"must be one of {', '.join(MODES)}"),
                 ("seed", _is_int(self.seed) and self.seed >= 0, "must be an integer >= 0"),
                 ("norm_multiple", _is_num(self.norm_multiple) and self.norm_multiple >= 1,
                  "must be a number >= 1")]
        problems = [f"audit.{name}: {rule} (got {getattr(self, name)!r})"
                    for name, ok, rule in rules if not ok]
        if problems:
            raise ConfigError(problems)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        np.isfinite(value))


@dataclass(frozen=True, kw_only=True)
class AuditResult:
    """One audit: claimed vs audited epsilon and what it took."""

    mode: str
    canaries: int
    included: int
    confidence: float
    delta: float
    epsilon_claimed: float
    epsilon_audited: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    test_accuracy: float
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (one row of ``audits.parquet`` without the study's columns)."""
        return dataclasses.asdict(self)


# --- 1: the bound (jax-privacy) -------------------------------------------------------

def require_auditing() -> Any:
    """The ``jax_privacy.auditing`` module, or :class:`AuditUnavailableError`."""
    try:
        from jax_privacy import auditing
    except ImportError as err:
        raise AuditUnavailableError(MISSING_EXTRA) from err
    return auditing


def epsilon_lower_bound(in_scores: np.ndarray, out_scores: np.ndarray, *,
                        confidence: float, delta: float) -> float:
    """One-run epsilon lower bound at ``confidence`` (higher score = guessed "in").

    ``CanaryScoreAuditor.epsilon_one_run`` with its default threshold strategy
    (Bonferroni over all thresholds, so choosing the best one is paid for)."""
    auditing = require_auditing()
    auditor = auditing.CanaryScoreAuditor(np.asarray(in_scores, dtype=np.float64),
                                          np.asarray(out_scores, dtype=np.float64))
    return float(auditor.epsilon_one_run(significance=1.0 - confidence, delta=delta))


# --- 2: the optimizer that takes canaries ---------------------------------------------

class CanaryDPOptimizer(MaskedDPOptimizer):
    """Adds the step's sampled white-box canaries to the per-sample gradients, then runs
    the optimizer's own pipeline (mask, clip, accumulate, noise, scale, step)."""

    canaries: DiracCanaries | None = None

    def pre_step(self, closure: Any = None) -> bool:
        """Inject canary rows, then the usual pre-step."""
        if self.canaries is not None and self.starts_logical_batch:
            self.canaries.inject(self.params)
        return super().pre_step(closure)


def canary_optimizer(under_test: type[MaskedDPOptimizer]) -> type[MaskedDPOptimizer]:
    """:class:`CanaryDPOptimizer` over ``under_test`` (a MaskedDPOptimizer subclass)."""
    if under_test is MaskedDPOptimizer:
        return CanaryDPOptimizer
    return type(f"Canary{under_test.__name__}", (CanaryDPOptimizer, under_test), {})


# --- 3-5: the run ---------------------------------------------------------------------

def run_audit(trial: TrialConfig | dict[str, Any], audit: AuditConfig, *,
              optimizer_cls: type[MaskedDPOptimizer] = MaskedDPOptimizer) -> AuditResult:
    """Train ``trial`` once with canaries and return claimed vs audited epsilon."""
    require_auditing()
    cfg = trial if isinstance(trial, TrialConfig) else TrialConfig.from_dict(trial)
    started = time.perf_counter()
    run = build_run(cfg, optimizer_cls=canary_optimizer(optimizer_cls))
    generator = torch.Generator().manual_seed(10_007 + audit.seed)
    canaries = insert_canaries(run, audit, generator)
    train_all(run)
    with run.evaluated_weights():  # the released model: the average with optim.ema_decay
        if isinstance(canaries, DiracCanaries):
            scores = canaries.scores(run.optimizer.params)
        else:
            scores = canaries.scores(run.model, run.device)
        _, accuracy = evaluate(run.model, run.data.test, cfg.eval_batch_size, run.device)
    included = canaries.included.numpy()
    bound = epsilon_lower_bound(scores[included], scores[~included],
                                confidence=audit.confidence, delta=run.plan.delta)
    return AuditResult(
        mode=audit.mode, canaries=audit.canaries, included=int(included.sum()),
        confidence=audit.confidence, delta=run.plan.delta,
        epsilon_claimed=float(run.accountant.get_epsilon(delta=run.plan.delta)),
        epsilon_audited=bound, noise_multiplier=run.plan.noise_multiplier,
        sample_rate=run.plan.sample_rate, steps=run.plan.steps, test_accuracy=accuracy,
        wall_time_s=time.perf_counter() - started)


def insert_canaries(run: Run, audit: AuditConfig,
                    generator: torch.Generator) -> DiracCanaries | MislabeledCanaries:
    """Draw the canaries and wire them into the run (optimizer or training data)."""
    if audit.mode == "white-box":
        opt = run.optimizer
        canaries = DiracCanaries(
            [p.detach() for p in opt.params], opt.trainable, count=audit.canaries,
            sample_rate=run.plan.sample_rate, clip_norm=opt.max_grad_norm,
            generator=generator, norm_multiple=audit.norm_multiple)
        opt.canaries = canaries
        return canaries
    canaries = MislabeledCanaries(run.data.train, count=audit.canaries,
                                  num_classes=run.data.num_classes, generator=generator)
    run.data = dataclasses.replace(run.data, train=canaries.training_split())
    return canaries


def train_all(run: Run) -> None:
    """All planned steps, one epoch at a time (no checkpoints: an audit is one run)."""
    done, per_epoch = 0, steps_per_epoch(run.plan.sample_rate)
    while done < run.plan.steps:
        n = min(per_epoch, run.plan.steps - done)
        train_epoch(run, n)
        done += n
