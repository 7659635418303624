"""Every use of another library's private (or developer-only) API, in one place.

Each entry names the version it was checked against; ``tests/trainables/test_compat.py``
fails when one of them moves, so an upgrade shows here and nowhere else. Nothing is
imported at module level: the Ray and Optuna pieces are mixins and lazy functions, so this
module costs nothing to import and ``trainables`` still imports no Optuna.

- Ray 2.60: the running node's temp folder (``ray._private.worker._global_node``), the
  autoscaler's node types (``ray._private.state.state.get_cluster_config``), and a trial's
  storage (``TuneContext.get_storage``, a ``DeveloperAPI``); the controller's experiment
  snapshot (``TuneController.checkpoint``, a trial's ``run_metadata``, the checkpoint
  manager's ``_last_sync_time``), by :func:`snapshot_on_change`; the step an experiment
  state was written at (``runner_data._iteration``), by :func:`experiment_state_step`.
- Ray 2.60's ``OptunaSearch``: its Optuna study, asked trials, storage and completed set
  (``_ot_study``, ``_ot_trials``, ``_storage``, ``_completed_trials``), by
  :class:`OptunaSearchState`.
- dp-accounting 0.6.0's ``RdpAccountant``: its orders and RDP curve (``_orders``, ``_rdp``)
  and its composition hook (``_maybe_compose``), by :class:`RdpComposeHook`.
- Opacus 1.6.0's RDP analysis: ``opacus.accountants.analysis.rdp.compute_rdp``, looked up on
  its module at every call (by Opacus' RDP accountant, and so by the PRV accountant's domain
  bound), is wrapped to remember the per-step curve of each (q, sigma, orders), by
  :func:`memoize_rdp`.
"""

from __future__ import annotations

from typing import Any

#: The versions each shim was checked against (see the module docstring).
CHECKED_AGAINST = {"ray": "2.60.0", "dp-accounting": "0.6.0", "opacus": "1.6.0"}


# -- Ray ---------------------------------------------------------------------------------


def ray_session_temp_dir() -> str | None:
    """The temp folder of the Ray session this process is attached to, or None."""
    try:
        import ray

        node = ray._private.worker._global_node
    except (ImportError, AttributeError):
        return None
    return None if node is None else node.get_temp_dir_path()


def autoscaler_cluster_config() -> Any | None:
    """The autoscaler's cluster config as it reported it to the GCS (node types with
    ``name``, ``resources``, ``max_count``), or None without an autoscaler."""
    try:
        from ray._private.state import state

        return state.get_cluster_config()
    except Exception:  # noqa: BLE001 (no autoscaler, no GCS, or an older Ray)
        return None


def trial_storage() -> tuple[Any, str] | None:
    """``(pyarrow filesystem, trial folder)`` of the Tune trial running in this process,
    or None outside a trial."""
    try:
        from ray import tune

        storage = tune.get_context().get_storage()
        return storage.storage_filesystem, storage.trial_fs_path
    except (ImportError, AttributeError, RuntimeError):
        return None


def snapshot_on_change() -> None:
    """Make Tune's controller skip an experiment snapshot when no trial changed since its
    last one (idempotent; this process's ``TuneController``, checked against Ray 2.60).

    With ``TUNE_GLOBAL_CHECKPOINT_S=0`` (see :func:`study.execution.cluster.init_ray`) Tune
    snapshots at every controller step, about ten a second while trials train: every trial's
    JSON, the pickled searcher (its whole Optuna study) and the callbacks' state, each time,
    on the driver's CPU. What a resume needs changes only when a trial is added, changes
    status, fails, reports a result or saves a checkpoint: a step with none of these is not
    snapshotted. A forced snapshot (``force`` or ``wait``: the end of the experiment, an
    interrupt) always is. A snapshot reaches the experiment directory only by a background
    sync, which Tune does not start while the previous one still runs: until one starts
    after it, each step snapshots again, as Tune's own did (else a resume after ``kill -9``
    reads an older state until another trial changes, e.g. re-runs a finished trial)."""
    import weakref

    from ray.tune.execution.tune_controller import TuneController

    if getattr(TuneController.checkpoint, "dpstudy_on_change", False):
        return
    original = TuneController.checkpoint
    seen: weakref.WeakKeyDictionary[Any, list[tuple]] = weakref.WeakKeyDictionary()

    def checkpoint(self: Any, force: bool = False, wait: bool = False) -> None:
        # the result dicts and checkpoint results are compared by identity (held here, so
        # an id is never reused while compared); Tune replaces them on every report
        now = [(t.trial_id, t.status, t.run_metadata.num_failures,
                t.run_metadata.last_result, t.latest_checkpoint_result)
               for t in self.get_trials()]
        before = seen.get(self)
        if not (force or wait) and before is not None and len(before) == len(now) and all(
                a[:3] == b[:3] and a[3] is b[3] and a[4] is b[4]
                for a, b in zip(before, now, strict=True)):
            return None
        manager = self._checkpoint_manager  # its _last_sync_time: when it last started a sync
        started = manager._last_sync_time
        original(self, force=force, wait=wait)
        if manager._last_sync_time != started:
            seen[self] = now
        else:  # not synced yet: this state is only in the staging folder
            seen.pop(self, None)
        return None

    checkpoint.dpstudy_on_change = True  # type: ignore[attr-defined]
    checkpoint.__wrapped__ = original  # type: ignore[attr-defined]
    TuneController.checkpoint = checkpoint


def experiment_state_step(data: bytes) -> int:
    """The controller step at which Tune wrote an ``experiment_state-*.json`` (the
    controller's ``_iteration``, saved in ``runner_data``); -1 if it cannot be read."""
    import json

    try:
        return int(json.loads(data)["runner_data"]["_iteration"])
    except (ValueError, TypeError, KeyError):
        return -1


class OptunaSearchState:
    """Mixin for Ray Tune's ``OptunaSearch``: public names for the state it keeps in
    private attributes. Put it first in the bases: ``class S(OptunaSearchState,
    OptunaSearch)``."""

    @property
    def optuna_study(self) -> Any:
        """The ``optuna.Study`` the searcher asks and tells (None before setup)."""
        return self._ot_study

    @optuna_study.setter
    def optuna_study(self, study: Any) -> None:
        self._ot_study = study

    @property
    def optuna_storage(self) -> Any:
        """The Optuna storage the study persists to (None: in memory)."""
        return self._storage

    @optuna_storage.setter
    def optuna_storage(self, storage: Any) -> None:
        self._storage = storage

    @property
    def optuna_trials(self) -> dict[str, Any]:
        """Tune trial id -> the ``optuna.Trial`` asked for it."""
        return self._ot_trials

    @property
    def completed_trials(self) -> set[str]:
        """Tune trial ids already told to Optuna."""
        return self._completed_trials


# -- Opacus ------------------------------------------------------------------------------

#: Most (q, sigma, orders) per-step RDP curves :func:`memoize_rdp` keeps per process.
RDP_MEMO_SIZE = 4096


def memoize_rdp() -> None:
    """Make Opacus' ``compute_rdp`` remember the per-step RDP curve of each (q, sigma,
    orders) in this process (idempotent).

    Every PRV ``get_epsilon`` bounds its domain with two RDP accountants over the same
    (q, sigma), and a calibration asks about the same sigma many times: the curve, a
    pure function of (q, sigma, order) and most of an evaluation's time, is computed once.
    The result is bit for bit Opacus' own: it computes ``curve * steps`` from the same
    ``curve`` (``curve * 1`` is ``curve`` exactly), so every epsilon is unchanged."""
    from opacus.accountants.analysis import rdp

    if getattr(rdp.compute_rdp, "dpstudy_memo", None) is not None:
        return
    original = rdp.compute_rdp
    memo: dict[tuple[str, str, tuple[str, ...]], Any] = {}

    def compute_rdp(*, q: float, noise_multiplier: float, steps: int, orders: Any) -> Any:
        if isinstance(orders, float):
            return original(q=q, noise_multiplier=noise_multiplier, steps=steps,
                            orders=orders)
        # repr: 12 and 12.0 (equal as keys) may take different paths through the analysis
        key = (repr(q), repr(noise_multiplier), tuple(map(repr, orders)))
        curve = memo.get(key)
        if curve is None:
            curve = original(q=q, noise_multiplier=noise_multiplier, steps=1, orders=orders)
            curve.setflags(write=False)
            if len(memo) >= RDP_MEMO_SIZE:
                memo.pop(next(iter(memo)))
            memo[key] = curve
        return curve * steps

    compute_rdp.dpstudy_memo = memo  # type: ignore[attr-defined]
    compute_rdp.__wrapped__ = original  # type: ignore[attr-defined]
    rdp.compute_rdp = compute_rdp


# -- dp-accounting -----------------------------------------------------------------------


class RdpComposeHook:
    """Mixin for dp-accounting's ``RdpAccountant``: composition of events it does not
    know goes through the public :meth:`compose_event`; put it first in the bases."""

    def _maybe_compose(self, event: Any, count: int, do_compose: bool) -> Any:
        return self.compose_event(event, count, do_compose)

    def compose_event(self, event: Any, count: int, do_compose: bool) -> Any:
        """Compose ``count`` times ``event`` (only check it when not ``do_compose``);
        return None, or the library's ``CompositionErrorDetails``. Override to handle
        new events, and call :meth:`library_compose` for the others."""
        return self.library_compose(event, count, do_compose)

    def library_compose(self, event: Any, count: int, do_compose: bool) -> Any:
        """The library's own composition of ``event``."""
        return super()._maybe_compose(event, count, do_compose)

    @property
    def orders(self) -> Any:
        """The Renyi orders the accountant tracks (numpy array)."""
        return self._orders

    def rdp_curve(self) -> Any:
        """The RDP of everything composed so far, one value per order (a copy)."""
        import numpy as np

        return np.array(self._rdp, dtype=np.float64)

    def add_rdp(self, curve: Any) -> None:
        """Compose an RDP curve (one value per order) computed elsewhere."""
        self._rdp = self._rdp + curve


def truncated_negative_binomial_gamma(shape: float, mean: float) -> float:
    """The parameter gamma of the truncated negative binomial with ``shape`` (eta) and
    ``mean``, exactly as ``RepeatAndSelectDpEvent`` derives it (dp-accounting 0.6.0's
    ``_gamma_truncated_negative_binomial``), so a drawn count follows the distribution
    the bound is computed for."""
    from dp_accounting.rdp import rdp_privacy_accountant

    return float(rdp_privacy_accountant._gamma_truncated_negative_binomial(shape, mean))
