"""The one-run privacy audit: real DP training on mnist-5k with canaries, on CPU.

Every audit here trains cnn-mnist (width 0.5) for 16 Poisson-sampled steps (expected batch
1000 of 4000, q=0.25, 4 epochs, sigma calibrated by the RDP accountant) with 1000 white-box
canaries, so each takes a few seconds.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("jax_privacy", reason="the audit extra: pip install 'dpstudy[audit]'")

from sabotage import SABOTAGES  # noqa: E402 (tests/trainables is on sys.path)

from trainables.audit import (  # noqa: E402
    MISSING_EXTRA,
    AuditConfig,
    AuditUnavailableError,
    epsilon_lower_bound,
    run_audit,
)
from trainables.canaries import DiracCanaries, trainable_coordinates  # noqa: E402
from trainables.config import ConfigError, TrialConfig  # noqa: E402
from trainables.optimizer import MaskedDPOptimizer  # noqa: E402

CANARIES = 1000
CONFIDENCE = 0.95


def trial(epsilon: float, *, drop_rate: float = 0.0, prune_rate: float = 0.0,
          seed: int = 0, reproducible: bool = False) -> dict:
    return {"seed": seed, "device": "cpu", "model": {"name": "cnn-mnist", "width": 0.5},
            "reproducible_noise": reproducible,
            "pruning": {"rate": prune_rate}, "dropping": {"rate": drop_rate},
            "privacy": {"epsilon": epsilon, "delta": 1e-5, "epochs": 4, "accountant": "rdp"},
            "optim": {"learning_rate": 1.0, "clip_norm": 1.0, "batch_size": 1000,
                      "max_epochs": 4}}


# --- the bound is the library's --------------------------------------------------------

def test_bound_is_jax_privacy_epsilon_one_run() -> None:
    from jax_privacy import auditing

    rng = np.random.default_rng(0)
    in_scores, out_scores = rng.normal(1.0, 1.0, 500), rng.normal(0.0, 1.0, 500)
    ours = epsilon_lower_bound(in_scores, out_scores, confidence=0.95, delta=1e-5)
    lib = auditing.CanaryScoreAuditor(in_scores, out_scores).epsilon_one_run(0.05, 1e-5)
    assert ours == pytest.approx(lib, abs=1e-9) and ours > 0


def test_bound_on_known_counts() -> None:
    """r canaries guessed "in", all correct, no abstention elsewhere: with delta -> 0 the
    one-run p-value is (e^eps / (1 + e^eps))^r (Steinke et al. 2023, Theorem 3.1), so the
    library's bound at one explicit threshold is logit(alpha^(1/r))."""
    from jax_privacy import auditing

    r, alpha = 40, 0.05
    in_scores = np.concatenate([np.full(r, 10.0), np.zeros(60)])
    out_scores = np.zeros(100)
    auditor = auditing.CanaryScoreAuditor(in_scores, out_scores)
    got = auditor.epsilon_one_run(alpha, 1e-12, threshold_strategy=auditing.Explicit(5.0))
    q = alpha ** (1 / r)
    assert got == pytest.approx(math.log(q / (1 - q)), rel=1e-4)
    # through our wrapper (Bonferroni over thresholds): lower, but positive
    ours = epsilon_lower_bound(in_scores, out_scores, confidence=1 - alpha, delta=1e-12)
    assert 0 < ours < got
    # indistinguishable scores prove nothing
    assert epsilon_lower_bound(np.zeros(50), np.zeros(50), confidence=0.95, delta=1e-5) == 0


def test_missing_extra_is_one_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jax_privacy", None)
    with pytest.raises(AuditUnavailableError, match=r"pip install 'dpstudy\[audit\]'"):
        run_audit(trial(1.0), AuditConfig(canaries=10))
    assert "dpstudy[audit]" in MISSING_EXTRA


def test_audit_config_collects_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        AuditConfig(canaries=1, confidence=1.5, mode="grey-box")
    assert len(err.value.problems) == 3
    assert "audit.confidence: must be in (0, 1) (got 1.5)" in err.value.problems


# --- canaries ---------------------------------------------------------------------------

def test_canary_coordinates_are_distinct_and_trainable() -> None:
    params = [torch.zeros(4, 5), torch.zeros(7)]
    trainable = [torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) < 0.5, None]
    coords = trainable_coordinates(params, trainable, 10, torch.Generator().manual_seed(0))
    assert len({(c.param, c.index) for c in coords}) == 10
    assert all(trainable[0].flatten()[c.index] for c in coords if c.param == 0)
    with pytest.raises(ValueError, match="audit.canaries: at most one canary per trainable"):
        trainable_coordinates(params, trainable, 100, torch.Generator())


def test_dirac_canary_rows_join_the_batch_and_isolate_real_gradients() -> None:
    p = torch.nn.Parameter(torch.zeros(3, 4))
    p.grad_sample = torch.ones(2, 3, 4)
    canaries = DiracCanaries([p], [None], count=5, sample_rate=1.0, clip_norm=2.0,
                             generator=torch.Generator().manual_seed(0), norm_multiple=10)
    canaries.inject([p])
    rows = p.grad_sample[2:]
    assert len(rows) == int(canaries.included.sum())  # q = 1: every included canary
    assert torch.all(rows.flatten(1).abs().sum(1) == 20.0)  # norm_multiple * C, one entry
    own = [c.index for c in canaries.coordinates]
    assert torch.all(p.grad_sample[:2].flatten(1)[:, own] == 0)  # real rows isolated
    assert p.grad_sample[:2].sum() == 2 * (12 - 5)


# --- real training: the correct mechanism stays under its claim --------------------------

@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_correct_mechanism_never_exceeds_claimed_epsilon(epsilon: float) -> None:
    # Fixed draws (seed 3, reproducible noise): with prune 0.5 the 1000 isolated canary
    # weights are ~29% of the trainable ones, and some draws of mask and noise leave 14
    # steps at chance; the "it trained" check below needs one draw, fixed, to be meaningful.
    result = run_audit(trial(epsilon, drop_rate=0.5, prune_rate=0.5, seed=3, reproducible=True),
                       AuditConfig(canaries=CANARIES, confidence=CONFIDENCE))
    assert result.epsilon_claimed <= epsilon + 1e-9
    assert result.epsilon_claimed > 0.9 * epsilon  # the budget really is spent
    assert 0 <= result.epsilon_audited <= result.epsilon_claimed
    assert result.included + (CANARIES - result.included) == CANARIES
    assert result.test_accuracy > 0.15  # it trained: above chance (0.1) in 16 noisy steps


# --- real training: every sabotage is caught --------------------------------------------

@pytest.mark.parametrize("name", sorted(SABOTAGES))
def test_sabotage_is_caught(name: str) -> None:
    """Claimed epsilon 2.0; the audited lower bound at 95% confidence exceeds it.

    noise-on-dropped only differs from a sound optimizer when coordinates are dropped, so
    that audit drops half of them each step (its canaries are kept half the time)."""
    drop = 0.5 if name == "noise-on-dropped" else 0.0
    result = run_audit(trial(2.0, drop_rate=drop),
                       AuditConfig(canaries=CANARIES, confidence=CONFIDENCE),
                       optimizer_cls=SABOTAGES[name])
    assert result.epsilon_claimed <= 2.0 + 1e-9
    assert result.epsilon_audited > result.epsilon_claimed, (
        f"{name}: audited {result.epsilon_audited:.3f} <= claimed {result.epsilon_claimed}")


def test_the_same_sabotage_is_invisible_to_the_accountant() -> None:
    """Why the audit exists: the accountant reports the same epsilon with or without it."""
    from trainables.train import build_run, train_epoch

    eps = []
    for cls in (MaskedDPOptimizer, SABOTAGES["no-noise"]):
        run = build_run(TrialConfig.from_dict(trial(2.0)), optimizer_cls=cls)
        train_epoch(run, 2)
        eps.append(run.accountant.get_epsilon(delta=1e-5))
    assert eps[0] == eps[1]


@pytest.mark.slow
def test_black_box_audit_stays_under_the_claim() -> None:
    result = run_audit(trial(8.0), AuditConfig(canaries=500, mode="black-box"))
    assert result.mode == "black-box" and result.canaries == 500
    assert 0 <= result.epsilon_audited <= result.epsilon_claimed <= 8.0 + 1e-9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_white_box_audit_on_cuda() -> None:
    """Canary rows are built on the parameters' device; generators stay on the CPU."""
    config = {**trial(2.0, drop_rate=0.5), "device": "cuda"}
    result = run_audit(config, AuditConfig(canaries=CANARIES))
    assert 0 <= result.epsilon_audited <= result.epsilon_claimed
    caught = run_audit(config, AuditConfig(canaries=CANARIES),
                       optimizer_cls=SABOTAGES["no-noise"])
    assert caught.epsilon_audited > caught.epsilon_claimed
