"""The search space and the search algorithm: Optuna behind Ray Tune's ``OptunaSearch``.

The space is define-by-run: :func:`suggest` asks an Optuna trial for every searched
parameter of the spec. It is a module-level function bound with ``functools.partial``, so
the searcher (and with it the Optuna study) pickles into Tune's experiment state and
comes back on ``dpstudy resume`` with every trial it has seen.

At a fixed epsilon, a noise multiplier below a floor cannot train even one epoch; the
floor is computed once per study (:func:`noise_floor`) and the searched range starts
there, so no trial is wasted on an impossible configuration.
"""

from __future__ import annotations

import functools
import logging

import optuna
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from study.spec import Param, SpecError, StudySpec
from trainables.accounting import noise_for_steps, steps_per_epoch

log = logging.getLogger(__name__)


def batch_sizes(spec: StudySpec) -> list[int]:
    """The extreme batch sizes a trial can use (fixed value, choices or range ends)."""
    p = spec.search.batch_size
    if p.is_fixed():
        return [int(p.value)]
    if p.choices is not None:
        return sorted({int(v) for v in p.choices})
    return [int(p.low), int(p.high)]


def noise_floor(spec: StudySpec, n: int) -> float | None:
    """Smallest noise multiplier that allows one epoch at the spec's budget (None when the
    spec searches epochs instead of noise)."""
    if spec.search.noise_multiplier is None:
        return None
    floors = []
    for batch in batch_sizes(spec):
        q = min(1.0, batch / n)
        floors.append(noise_for_steps(target_epsilon=spec.privacy.epsilon,
                                      delta=spec.privacy.delta, sample_rate=q,
                                      steps=steps_per_epoch(q),
                                      accountant=spec.privacy.accountant))
    return max(floors)


def check_space(spec: StudySpec, floor: float | None) -> None:
    """Reject a noise range that lies wholly below the one-epoch floor."""
    p = spec.search.noise_multiplier
    if floor is None or p is None or p.max_value() >= floor:
        return
    raise SpecError([f"search.noise_multiplier: must reach at least {floor:.3f}, the "
                     f"smallest noise that allows one epoch at epsilon="
                     f"{spec.privacy.epsilon:g}, delta={spec.privacy.delta:g} "
                     f"(got a maximum of {p.max_value()!r})"])


def suggest(trial: optuna.Trial, *, space: dict[str, Param | tuple[str, ...]],
            floor: float | None = None) -> None:
    """Define-by-run space: ask ``trial`` for each searched parameter."""
    for name, param in space.items():
        if isinstance(param, tuple):
            if len(param) > 1:
                trial.suggest_categorical(name, list(param))
            continue
        kind = param.distribution_kind()
        if kind == "categorical":
            choices = list(param.choices)
            if name == "noise_multiplier" and floor is not None:
                choices = [c for c in choices if c >= floor] or [max(choices)]
            trial.suggest_categorical(name, choices)
        elif kind == "int":
            trial.suggest_int(name, int(param.low), int(param.high), log=param.log,
                              step=int(param.step or 1))
        elif kind == "float":
            low = param.low
            if name == "noise_multiplier" and floor is not None:
                low = min(max(low, floor), param.high)
            trial.suggest_float(name, low, param.high, log=param.log, step=param.step)


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The configured Optuna sampler, seeded by the spec."""
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=spec.seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=spec.seed),
        "nsgaii": lambda: optuna.samplers.NSGAIISampler(seed=spec.seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=spec.seed),
    }
    return samplers[spec.sampler]()


def make_search(spec: StudySpec, floor: float | None) -> Searcher:
    """``OptunaSearch`` over the spec's space, behind a ``ConcurrencyLimiter``."""
    metrics = list(spec.objective.metrics)
    modes = list(spec.objective.modes)
    search = StudySearch(
        space=functools.partial(suggest, space=spec.parameters(), floor=floor),
        metric=metrics if spec.objective.multi else metrics[0],
        mode=modes if spec.objective.multi else modes[0],
        sampler=make_sampler(spec), study_name=spec.name)
    return ConcurrencyLimiter(search, max_concurrent=spec.max_concurrent)


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that tells Optuna a trial stopped early (by ASHA) was PRUNED when
    the objective is multi-objective, so an incomplete trial never enters the Pareto front
    as if it were complete. (Single-objective samplers keep its partial value.)"""

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        stopped = bool(result) and not error and not result.get("finished", False)
        multi = isinstance(self.metric, list)
        if stopped and multi and trial_id in self._ot_trials:
            if trial_id not in self._completed_trials:
                self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
                self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)
