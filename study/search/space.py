"""The search space and the search algorithm: Optuna behind Ray Tune's ``OptunaSearch``.

The space is define-by-run (:func:`suggest`, a module-level function bound with
``functools.partial``), so the searcher and its Optuna study pickle into Tune's experiment
state and come back on ``dpstudy resume`` with every trial they have seen.

Budget-exact search: at a fixed (epsilon, delta), a trial's noise multiplier must lie in
:func:`trainables.accounting.noise_interval` at *that trial's* sample rate and epoch cap
(below it, not even one epoch fits; above it, the epoch cap leaves budget unspent and the
accuracies are not comparable). So batch size and ``max_epochs`` are suggested first, then
the noise multiplier from the spec's range cut to that interval (:class:`NoiseBudget`);
:func:`check_space` rejects a range that misses it for some batch size the spec allows.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from study.search import persisted as optuna_storage
from study.spec.model import Param, SpecError, StudySpec
from trainables.accounting import noise_for_steps, noise_interval
from trainables.compat import OptunaSearchState

#: Optuna user attribute naming the Tune trial (the results' ``trial_id``) of a trial.
TUNE_TRIAL_ID = "tune_trial_id"
#: Parameters that the noise interval depends on: suggested before the noise multiplier.
_FIRST = ("batch_size", "max_epochs")
#: The spec's ``sampler`` -> its class in ``optuna.samplers``.
SAMPLER_CLASSES = {"tpe": "TPESampler", "random": "RandomSampler", "nsgaii": "NSGAIISampler",
                   "gp": "GPSampler"}


def extremes(p: Param | None) -> list[float]:
    """The extreme values a parameter can take (fixed value, choices or range ends)."""
    if p is None:
        return []
    if p.is_fixed():
        return [p.value]
    if p.choices is not None:
        return sorted({min(p.choices), max(p.choices)})
    return [p.low, p.high]


#: ``noise_interval`` cached per process (every suggested trial asks for one)
_interval = functools.lru_cache(maxsize=512)(noise_interval)


@dataclass(frozen=True)
class NoiseBudget:
    """What a trial's admissible noise range depends on: the budget and the number ``n`` of
    private training examples (after the validation and public hold-outs)."""

    epsilon: float
    delta: float
    accountant: str
    n: int

    def interval(self, batch_size: float, max_epochs: float) -> tuple[float, float]:
        """``(low, high)``: the noise multipliers that spend the budget in at most
        ``max_epochs`` at batch size ``batch_size``."""
        q = min(1.0, float(batch_size) / self.n)
        return _interval(target_epsilon=self.epsilon, delta=self.delta, sample_rate=q,
                         max_epochs=float(max_epochs), accountant=self.accountant)

    def common_interval(self, batch_size: Param, max_epochs: Param) -> tuple[float, float]:
        """The noise multipliers that spend the budget at *every* batch size and epoch cap
        the parameters allow (empty when low > high). Noise ``choices`` are cut to this
        fixed interval: Optuna needs the same categorical choices in every trial."""
        ends = [self.interval(b, e) for b, e in
                itertools.product(extremes(batch_size), extremes(max_epochs))]
        return max(low for low, _ in ends), min(high for _, high in ends)


def noise_budget(spec: StudySpec, n: int) -> NoiseBudget | None:
    """The :class:`NoiseBudget` of a spec that searches the noise multiplier (None when it
    searches epochs and calibrates the noise instead)."""
    if spec.search.noise_multiplier is None:
        return None
    p = spec.privacy
    return NoiseBudget(epsilon=p.epsilon, delta=p.delta, accountant=p.accountant, n=n)


def check_space(spec: StudySpec, budget: NoiseBudget | None, n: int | None = None) -> None:
    """Reject a budget no noise can meet, and a noise range that misses the
    budget-spending interval at some extreme batch size and epoch cap the spec allows (both
    ends of the interval grow with each). In ``epochs`` mode (``budget`` None) check that
    the noise can be calibrated at the extremes of ``n`` private training examples."""
    p = spec.privacy
    try:
        if budget is not None:
            _check_noise(spec, budget)
        elif n is not None and spec.search.epochs is not None:
            for batch, epochs in itertools.product(extremes(spec.search.batch_size),
                                                   extremes(spec.search.epochs)):
                q = min(1.0, batch / n)
                noise_for_steps(target_epsilon=p.epsilon, delta=p.delta, sample_rate=q,
                                steps=max(1, round(epochs / q)), accountant=p.accountant)
    except SpecError:
        raise
    except ValueError as err:  # Opacus: "The privacy budget is too low."
        raise SpecError([f"privacy.epsilon: no noise multiplier meets epsilon="
                         f"{p.epsilon:g} at delta={p.delta:g} with the {p.accountant} "
                         f"accountant ({err}); raise epsilon or delta, or use accountant: prv "
                         f"(got {p.epsilon!r})"]) from None


def _check_noise(spec: StudySpec, budget: NoiseBudget) -> None:
    p = spec.search.noise_multiplier
    problems = []
    if p.choices is not None:
        low, high = budget.common_interval(spec.search.batch_size, spec.search.max_epochs)
        if not admissible(p, low, high):
            problems.append(
                f"search.noise_multiplier: at least one choice must spend "
                f"epsilon={budget.epsilon:g} (delta={budget.delta:g}) in one to max_epochs "
                f"epochs at every batch size the spec allows, i.e. lie in "
                f"[{low:.3f}, {high:.3f}] (an empty interval: give a range instead) "
                f"(got {list(p.choices)})")
    for batch, epochs in itertools.product(extremes(spec.search.batch_size),
                                           extremes(spec.search.max_epochs)):
        low, high = budget.interval(batch, epochs)
        if not admissible(p, low, high):
            got = list(p.choices) if p.choices is not None else (
                p.value if p.is_fixed() else f"[{p.low:g}, {p.high:g}]")
            problems.append(
                f"search.noise_multiplier: must reach into [{low:.3f}, {high:.3f}], the noise "
                f"multipliers that spend epsilon={budget.epsilon:g} (delta={budget.delta:g}) "
                f"in one to max_epochs={epochs:g} epochs at batch_size={batch:g} of "
                f"n={budget.n} training examples (got {got})")
    if problems:
        raise SpecError(problems)


def admissible(p: Param, low: float, high: float) -> bool:
    """Whether noise parameter ``p`` can take a value in ``[low, high]``."""
    if p.choices is not None:
        return any(low <= c <= high for c in p.choices)
    if p.is_fixed():
        return low <= p.value <= high
    return p.low <= high and p.high >= low


def suggest(trial: optuna.Trial, *, space: dict[str, Param | tuple[str, ...]],
            budget: NoiseBudget | None = None) -> None:
    """Define-by-run space: ask ``trial`` for each searched parameter; the noise multiplier
    last but within the interval that spends the budget at the batch size and epoch cap
    just drawn."""
    for name in sorted(space, key=lambda k: (k not in _FIRST, k == "noise_multiplier")):
        param = space[name]
        if isinstance(param, tuple):
            if len(param) > 1:
                trial.suggest_categorical(name, list(param))
            continue
        if name == "noise_multiplier" and budget is not None:
            if param.choices is not None:
                low, high = budget.common_interval(space["batch_size"], space["max_epochs"])
            else:
                low, high = budget.interval(
                    trial.params.get("batch_size", space["batch_size"].value),
                    trial.params.get("max_epochs", space["max_epochs"].value))
            _suggest_noise(trial, param, low, high)
            continue
        kind = param.distribution_kind()
        if kind == "categorical":
            trial.suggest_categorical(name, list(param.choices))
        elif kind == "int":
            trial.suggest_int(name, int(param.low), int(param.high), log=param.log,
                              step=int(param.step or 1))
        elif kind == "float":
            trial.suggest_float(name, param.low, param.high, log=param.log, step=param.step)


def _suggest_noise(trial: optuna.Trial, p: Param, low: float, high: float) -> None:
    """The noise multiplier from ``p`` cut to ``[low, high]`` (the nearest admissible value
    if they miss each other, which :func:`check_space` rules out for the extremes)."""
    name = "noise_multiplier"
    if p.is_fixed():
        return
    if p.choices is not None:
        inside = [c for c in p.choices if low <= c <= high]
        nearest = min(p.choices, key=lambda c: min(abs(c - low), abs(c - high)))
        trial.suggest_categorical(name, inside or [nearest])
        return
    lo, hi = max(p.low, low), min(p.high, high)
    if lo > hi:
        lo = hi = min(max(p.low, low), p.high) if p.low > high else max(p.low, low)
    if p.step:  # stay on the spec's grid p.low + k * step inside the cut range
        first, last = math.ceil((lo - p.low) / p.step - 1e-9), math.floor(
            (hi - p.low) / p.step + 1e-9)
        k_lo, k_hi = (first, last) if first <= last else (last, last) if last >= 0 else (0, 0)
        lo, hi = (round(p.low + k * p.step, 12) for k in (k_lo, k_hi))
    trial.suggest_float(name, lo, hi, log=p.log, step=p.step)


def baseline_point(spec: StudySpec) -> dict[str, float]:
    """The rates of plain DP-SGD (prune 0, drop 0) for those rates the spec searches and
    allows 0 for; empty when ``baseline_trial`` is off or no rate is searched, and in a
    private-selection study, whose K trials must be identical, independent random draws
    (a pinned first trial would void the selection bound)."""
    if not spec.baseline_trial or spec.selection.private:
        return {}
    rates = {name: getattr(spec.search, name) for name in ("prune_rate", "drop_rate")}
    return {name: 0.0 for name, p in rates.items()
            if not p.is_fixed() and admissible(p, 0.0, 0.0)}


def make_search(spec: StudySpec, budget: NoiseBudget | None,
                storage: optuna.storages.BaseStorage | None = None) -> Searcher:
    """``OptunaSearch`` over the spec's space, behind a ``ConcurrencyLimiter``. With
    ``baseline_trial`` the first trial is plain DP-SGD (its other hyperparameters sampled),
    so every study has a baseline to compare with. ``storage`` persists the Optuna study
    (:mod:`study.search.persisted`); None keeps it in memory (and in Tune's pickled state)."""
    goal = spec.objective
    metric, mode = (list(goal.metrics), list(goal.modes)) if goal.multi else goal.primary
    point = baseline_point(spec)
    search = StudySearch(
        points_to_evaluate=[point] if point else None,
        space=functools.partial(suggest, space=spec.parameters(), budget=budget),
        metric=metric, mode=mode, study_name=spec.name, storage=storage,
        sampler=getattr(optuna.samplers, SAMPLER_CLASSES[spec.sampler])(seed=spec.seed))
    return ConcurrencyLimiter(search, max_concurrent=spec.max_concurrent)


class StudySearch(OptunaSearchState, OptunaSearch):
    """``OptunaSearch`` that tells Optuna a trial stopped early (by ASHA) of a
    multi-objective study was PRUNED, so it never enters the Pareto front as if complete.

    With a journal storage, :meth:`restore` reloads the Optuna study from the journal, and a
    trial told before a driver was killed is neither told nor sent its epochs again when
    Tune re-runs it after the resume (Optuna refuses to update a finished trial)."""

    #: Tune trial ids the searcher knew when it was restored (only those can have been told
    #: before a kill); empty for a study that was not resumed.
    restored_trials: frozenset[str] = frozenset()

    def restore(self, checkpoint_path: str) -> None:
        """Tune's pickled state, then the Optuna study from its journal
        (:func:`~study.search.persisted.restored_journal`)."""
        super().restore(checkpoint_path)
        if self.optuna_storage is None or self.optuna_study is None:
            return
        path = optuna_storage.restored_journal(self.optuna_storage, checkpoint_path)
        if path is not None:
            self.optuna_storage = optuna_storage.open_storage(path)
            self.optuna_study = optuna_storage.reattach(self.optuna_study, self.optuna_trials,
                                                     self.optuna_storage)
            self.restored_trials = frozenset(self.optuna_trials)

    def told_before_restore(self, trial_id: str) -> bool:
        """Whether the trial was already finished in Optuna's storage when the study was
        resumed (told before the driver was killed, run again by Tune)."""
        trial = self.optuna_trials.get(trial_id)
        return (trial is not None and trial_id in self.restored_trials
                and any(t.number == trial.number and t.state.is_finished()
                        for t in self.optuna_study.get_trials(deepcopy=False)))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self.told_before_restore(trial_id):
            super().on_trial_result(trial_id, result)

    def suggest(self, trial_id: str) -> dict | None:
        """Ask Optuna for a trial, and tag it with the Tune trial id (the ``trial_id`` of
        the Parquet results), so both can be joined in the dashboard and in notebooks."""
        config = super().suggest(trial_id)
        if isinstance(config, dict) and trial_id in self.optuna_trials:
            self.optuna_trials[trial_id].set_user_attr(TUNE_TRIAL_ID, trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id not in self.completed_trials and self.told_before_restore(trial_id):
            self.completed_trials.add(trial_id)  # told before a kill; Tune ran it again
            return
        stopped = bool(result) and not error and not result.get("finished", False)
        multi = isinstance(self.metric, list)
        if stopped and multi and trial_id in self.optuna_trials:
            if trial_id not in self.completed_trials:
                self.optuna_study.tell(self.optuna_trials[trial_id], state=TrialState.PRUNED)
                self.completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)
