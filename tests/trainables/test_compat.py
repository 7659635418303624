"""The private APIs of other libraries that ``trainables.compat`` relies on are still where
it expects them: each test fails when an upgrade moves one (see ``CHECKED_AGAINST``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from trainables import compat


class _Accountant(compat.RdpComposeHook, RdpAccountant):
    """Doubles every Gaussian event through the public hook."""

    def compose_event(self, event, count, do_compose):
        if isinstance(event, dp_event.GaussianDpEvent):
            return self.library_compose(event, 2 * count, do_compose)
        return self.library_compose(event, count, do_compose)


def test_rdp_hook_reaches_the_library_composition_and_its_state() -> None:
    orders = [2.0, 4.0, 8.0, 16.0]
    event = dp_event.GaussianDpEvent(2.0)
    hooked, plain = _Accountant(orders=orders), RdpAccountant(orders=orders)
    hooked.compose(event)            # goes through the library's private _maybe_compose
    plain.compose(event, count=2)
    assert np.array_equal(hooked.orders, np.array(orders))
    assert np.allclose(hooked.rdp_curve(), np.array(orders) / (2 * 2.0**2) * 2)
    assert math.isclose(hooked.get_epsilon(1e-5), plain.get_epsilon(1e-5))
    hooked.add_rdp(hooked.rdp_curve())  # composing its own curve once more doubles it
    plain.compose(event, count=2)
    assert math.isclose(hooked.get_epsilon(1e-5), plain.get_epsilon(1e-5))


def test_rdp_hook_composes_selection_around_a_new_event() -> None:
    """RepeatAndSelectDpEvent asks the hook for its inner event (the study bound's use)."""
    inner = dp_event.GaussianDpEvent(3.0)
    outer = dp_event.RepeatAndSelectDpEvent(inner, mean=5.0, shape=1.0)
    seen = []

    class Spy(compat.RdpComposeHook, RdpAccountant):
        def compose_event(self, event, count, do_compose):
            seen.append(type(event).__name__)
            return self.library_compose(event, count, do_compose)

    Spy().compose(outer)
    assert seen[0] == "RepeatAndSelectDpEvent" and "GaussianDpEvent" in seen


def test_truncated_negative_binomial_gamma_matches_the_library_mean() -> None:
    gamma = compat.truncated_negative_binomial_gamma(1.0, 4.0)  # geometric: mean 1/gamma
    assert math.isclose(gamma, 0.25, rel_tol=1e-6)


def test_optuna_search_keeps_its_state_where_the_mixin_reads_it() -> None:
    pytest.importorskip("optuna")
    from ray.tune.search.optuna import OptunaSearch

    class Search(compat.OptunaSearchState, OptunaSearch):
        pass

    search = Search(space=lambda trial: {"x": trial.suggest_float("x", 0, 1)},
                    metric="y", mode="max")
    assert search.optuna_study is not None and search.optuna_storage is None
    config = search.suggest("t1")
    assert "x" in config and "t1" in search.optuna_trials
    search.on_trial_complete("t1", {"y": 1.0, "x": config["x"]})
    assert "t1" in search.completed_trials
    assert search.optuna_study.trials[0].value == 1.0
    search.optuna_study = None
    assert search._ot_study is None


def test_ray_private_accessors_exist() -> None:
    import ray
    from ray._private.state import state

    assert hasattr(ray._private.worker, "_global_node")
    assert callable(state.get_cluster_config)
    assert compat.autoscaler_cluster_config() is None or hasattr(
        compat.autoscaler_cluster_config(), "node_group_configs")
    if not ray.is_initialized():
        assert compat.ray_session_temp_dir() is None


def test_trial_storage_is_a_tune_context_developer_api() -> None:
    from ray import tune

    assert callable(getattr(tune.get_context(), "get_storage", None))
    assert compat.trial_storage() is None  # outside a trial


def test_rdp_memo_returns_opacus_own_curves() -> None:
    """The memo wraps Opacus' ``compute_rdp`` where its accountants look it up, and returns
    bit for bit what Opacus computes, at every number of steps, computed or remembered."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    compat.memoize_rdp()
    compat.memoize_rdp()  # idempotent: wrapped once
    original = rdp.compute_rdp.__wrapped__
    assert getattr(original, "dpstudy_memo", None) is None
    orders = RDPAccountant.DEFAULT_ALPHAS
    for q, sigma, steps in [(0.07, 1.1, 50), (0.07, 1.1, 3), (0.07, 1.3, 50), (1.0, 2.0, 1),
                            (0.0, 1.0, 5), (0.01, 0.5, 1000), (0.07, 1.1, 0)]:
        for _ in range(2):  # computed, then remembered
            got = rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
            want = original(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
    assert rdp.compute_rdp(q=0.07, noise_multiplier=1.1, steps=2, orders=4.5) == original(
        q=0.07, noise_multiplier=1.1, steps=2, orders=4.5)  # a scalar order: not remembered
    ints, floats = [2, 3, 12], [2.0, 3.0, 12.0]  # equal keys, but kept apart
    for o in (ints, floats):
        np.testing.assert_array_equal(
            rdp.compute_rdp(q=0.07, noise_multiplier=1.1, steps=7, orders=o),
            original(q=0.07, noise_multiplier=1.1, steps=7, orders=o))
    assert rdp.compute_rdp.dpstudy_memo


def test_tune_snapshots_only_when_a_trial_changed() -> None:
    """The wrapped ``TuneController.checkpoint`` (the controller's experiment snapshot) runs
    Tune's own after a trial is added, changes status, fails, reports or checkpoints, and
    whenever forced; a step with no change is skipped. Real ``Trial`` objects, so a moved
    attribute fails here."""
    import inspect

    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    compat.snapshot_on_change()
    compat.snapshot_on_change()  # idempotent: wrapped once
    original = TuneController.checkpoint.__wrapped__
    assert not getattr(original, "dpstudy_on_change", False)
    assert list(inspect.signature(original).parameters) == ["self", "force", "wait"]
    assert callable(TuneController.get_trials)

    class Manager:  # starts a sync at every snapshot
        def __init__(self) -> None:
            self.calls: list[tuple[bool, bool]] = []
            self._last_sync_time: float | None = None

        def sync_up_experiment_state(self, save_fn, force: bool, wait: bool) -> None:
            self.calls.append((force, wait))
            self._last_sync_time = float(len(self.calls))

    class Controller:  # what Tune's own checkpoint() and the wrapper use of a controller
        def __init__(self) -> None:
            self.trials: list[Trial] = []
            self._checkpoint_manager = Manager()

        def get_trials(self) -> list[Trial]:
            return self.trials

        def save_to_dir(self) -> None:
            pass

    controller = Controller()
    calls = controller._checkpoint_manager.calls

    def step(**kwargs: bool) -> int:
        before = len(calls)
        TuneController.checkpoint(controller, **kwargs)
        return len(calls) - before

    assert step() == 1  # the first snapshot
    assert step() == 0  # nothing changed
    first = Trial("__fake", stub=True)
    controller.trials.append(first)
    assert (step(), step()) == (1, 0)  # a trial added
    first.set_status(Trial.RUNNING)
    assert (step(), step()) == (1, 0)  # a status changed
    first.update_last_result({"training_iteration": 1})
    assert (step(), step()) == (1, 0)  # a result
    first.update_last_result({"training_iteration": 1})  # the same values, a new report
    assert step() == 1
    first.run_metadata.num_failures += 1
    assert (step(), step()) == (1, 0)  # a failure
    first.run_metadata.checkpoint_manager._latest_checkpoint_result = object()
    assert first.latest_checkpoint_result is not None
    assert (step(), step()) == (1, 0)  # a checkpoint
    assert step(force=True) == 1 and step(wait=True) == 1  # forced: always
    assert calls[-2:] == [(True, False), (False, True)]
    other = Controller()  # each controller remembers its own last snapshot
    TuneController.checkpoint(other)
    assert len(other._checkpoint_manager.calls) == 1


def test_tune_snapshots_again_until_a_sync_carries_it() -> None:
    """A snapshot whose sync Tune did not start (the previous sync still running, or the
    snapshot period not over) is taken again at the next step, changed or not: else the
    experiment directory keeps an older state (a finished trial still running) until another
    trial changes, and a resume after ``kill -9`` re-runs that trial. Tune's own checkpoint
    manager, so a renamed attribute fails here."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    compat.snapshot_on_change()

    class Syncer:
        def __init__(self) -> None:
            self.busy, self.synced = True, 0

        def sync_up(self, local_dir: str, remote_dir: str) -> bool:
            self.synced += not self.busy
            return not self.busy

        def wait(self) -> None:
            self.busy = False

    class Storage:
        experiment_driver_staging_path = "/staging"
        experiment_fs_path = "/experiment"

        def __init__(self) -> None:
            self.syncer = Syncer()

    class Controller:
        def __init__(self, period: float) -> None:
            self.saves, self.trials = 0, []
            self._checkpoint_manager = _ExperimentCheckpointManager(
                storage=Storage(), checkpoint_period=period, sync_every_n_trial_checkpoints=2)

        def get_trials(self) -> list:
            return self.trials

        def save_to_dir(self) -> None:
            self.saves += 1

    controller = Controller(period=0)
    syncer = controller._checkpoint_manager._storage.syncer
    TuneController.checkpoint(controller)  # saved, not synced: the syncer is busy
    TuneController.checkpoint(controller)  # nothing changed, but not synced yet: again
    assert (controller.saves, syncer.synced) == (2, 0)
    syncer.busy = False
    TuneController.checkpoint(controller)
    assert (controller.saves, syncer.synced) == (3, 1)
    TuneController.checkpoint(controller)  # synced and unchanged: skipped
    assert (controller.saves, syncer.synced) == (3, 1)

    throttled = Controller(period=3600)  # TUNE_GLOBAL_CHECKPOINT_S set by the user
    throttled._checkpoint_manager._storage.syncer.busy = False
    TuneController.checkpoint(throttled)  # the first snapshot
    throttled.trials.append(Trial("__fake", stub=True))
    TuneController.checkpoint(throttled)  # a trial added, within the period: not saved
    assert throttled.saves == 1
    throttled._checkpoint_manager._last_save_time = float("-inf")  # the period is over
    TuneController.checkpoint(throttled)  # nothing changed since, but the trial is unsaved
    assert throttled.saves == 2


def test_experiment_state_step_reads_the_controller_iteration() -> None:
    """Tune's controller counts its steps in ``_iteration`` and saves it with its state
    (``runner_data`` is its ``__getstate__``); anything unreadable is step -1."""
    import inspect

    from ray.tune.execution.tune_controller import TuneController

    assert "self._iteration += 1" in inspect.getsource(TuneController.step)
    assert '"_iteration"' not in inspect.getsource(TuneController.__getstate__)  # kept
    assert compat.experiment_state_step(b'{"runner_data": {"_iteration": 42}}') == 42
    for bad in (b"", b'{"runner_data": {"_iteration": 4', b"[]", b'{"runner_data": {}}',
                b'{"runner_data": {"_iteration": null}}', b"\xff\xfe"):
        assert compat.experiment_state_step(bad) == -1
