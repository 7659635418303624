"""Run and resume studies: a spec becomes a Ray Tune experiment.

``run`` validates everything first (spec, data, noise floor) and writes nothing on a bad
spec. It then builds a ``Tuner``: ``OptunaSearch`` (define-by-run, seeded) behind a
``ConcurrencyLimiter``, an optional ``ASHAScheduler``, ``tune.with_resources``,
``FailureConfig(max_failures)`` and ``CheckpointConfig``; experiment state lives under
``storage/NAME``, next to the resolved spec (``dpstudy-spec.yaml``) that ``resume`` reads.
Results go to Parquet through :class:`study.callbacks.StudyCallback`, and once more from
the final ``ResultGrid`` so that no trial is ever missing.
"""

from __future__ import annotations

import math
import os
import posixpath
import sys
from dataclasses import dataclass
from typing import Any

import optuna
import pyarrow.fs as pafs
import yaml
from ray import tune

from study.callbacks import StudyCallback
from study.space import check_space, make_search, noise_floor
from study.spec import SpecError, StudySpec, check_against_data, load_spec
from study.status import SPEC_FILE
from trainables.data import dataset_size
from trainables.placement import ALLOC_CONF
from trainables.randomness import REPRODUCIBLE_NOISE_WARNING
from trainables.tune_trainable import run_trial


class StudyExistsError(RuntimeError):
    """``run`` would overwrite an existing experiment."""


@dataclass(frozen=True)
class Summary:
    """What a finished (or resumed) study reports back."""

    name: str
    experiment: str
    results: str
    completed: int
    stopped: int
    failed: int
    best: dict[str, Any] | None


# --- preparation (nothing written) -----------------------------------------------------

def prepare(spec_path: str, *, cluster: bool = False) -> tuple[StudySpec, float | None]:
    """Load and fully validate a spec; returns it with the one-epoch noise floor."""
    spec = load_spec(spec_path)
    check_against_data(spec, cluster=cluster)
    floor = noise_floor(spec, dataset_size(spec.dataset, seed=spec.seed))
    check_space(spec, floor)
    return spec, floor


def experiment_dir(spec: StudySpec) -> str:
    """``storage/NAME`` (a local path or a URI)."""
    base = spec.storage_path
    return posixpath.join(base, spec.name) if "://" in base else os.path.join(base, spec.name)


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _exists(path: str) -> bool:
    fs, where = _filesystem(path)
    return fs.get_file_info(where).type != pafs.FileType.NotFound


def save_spec(spec: StudySpec, directory: str) -> None:
    """Write the resolved spec next to Tune's experiment state."""
    fs, where = _filesystem(directory)
    fs.create_dir(where, recursive=True)
    with fs.open_output_stream(posixpath.join(where, SPEC_FILE)) as out:
        out.write(yaml.safe_dump(spec.to_dict(), sort_keys=False).encode())


def read_spec(directory: str) -> StudySpec:
    """The spec saved by :func:`save_spec` in an experiment directory."""
    fs, where = _filesystem(directory)
    path = posixpath.join(where, SPEC_FILE)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise SpecError([f"resume: {directory!r} is not a dpstudy experiment directory "
                         f"(no {SPEC_FILE})"])
    with fs.open_input_stream(path) as f:
        return StudySpec.from_dict(yaml.safe_load(f.read().decode()))


# --- Ray ------------------------------------------------------------------------------

def init_ray(address: str | None = None) -> None:
    """Connect to a cluster at ``address``, or start an embedded one on 127.0.0.1."""
    import ray

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF  # inherited by local workers
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        return
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (loopback only) must be set before Ray is
    # imported; the CLI does that for local runs.
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")


def gpu_node_capacity() -> tuple[list[float], dict[str, float]]:
    """GPUs of each live node, and of each node type the autoscaler may still start."""
    import ray

    nodes = [float(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]
    types: dict[str, float] = {}
    try:  # the autoscaler's node types, as it reported them to the GCS (if it runs)
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 (no autoscaler or an older Ray: nodes only)
        config = None
    for group in getattr(config, "node_group_configs", []) or []:
        if group.max_count != 0:
            types[group.name] = float(group.resources.get("GPU", 0))
    return nodes, types


def check_gpu_capacity(spec: StudySpec) -> None:
    """Fail fast when no node, now or after autoscaling, could ever hold one trial's GPUs
    (its trials would otherwise wait forever)."""
    gpu = spec.resources_per_trial.gpu
    if gpu <= 0:
        return
    nodes, types = gpu_node_capacity()
    if max([*nodes, *types.values()], default=0.0) >= gpu:
        return
    raise SpecError([
        f"resources_per_trial.gpu: each trial asks for {gpu:g} GPU(s) on one node, but no "
        f"node of this cluster can ever offer that (GPUs per live node: {nodes}; autoscaler "
        f"node types: {types or 'none'}); its trials would wait forever (got {gpu!r})"])


def dpstudy_trial(config: dict[str, Any], spec: StudySpec) -> None:
    """The Tune function trainable: sampled params -> trial config -> one DP trial."""
    resources = spec.resources_per_trial
    run_trial(spec.trial_config(config), cost_per_second=resources.cpu + resources.gpu)


def make_trainable(spec: StudySpec) -> Any:
    """``dpstudy_trial`` bound to the spec, with the spec's per-trial resources."""
    resources = {"cpu": spec.resources_per_trial.cpu, "gpu": spec.resources_per_trial.gpu}
    return tune.with_resources(tune.with_parameters(dpstudy_trial, spec=spec), resources)


def make_scheduler(spec: StudySpec) -> Any:
    """ASHA on the primary objective (epochs as time), or None."""
    if spec.scheduler.name != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    metric, mode = spec.objective.primary
    p = spec.search.max_epochs or spec.search.epochs
    return ASHAScheduler(time_attr="training_iteration", metric=metric, mode=mode,
                         max_t=max(1, math.ceil(p.max_value())),
                         grace_period=spec.scheduler.grace_period,
                         reduction_factor=spec.scheduler.reduction_factor)


def run_config(spec: StudySpec) -> tune.RunConfig:
    """Where state lives, how failures retry, what checkpoints are kept, who listens."""
    return tune.RunConfig(
        name=spec.name, storage_path=spec.storage_path, verbose=0,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=[StudyCallback(spec)])


# --- run and resume -------------------------------------------------------------------

def run(spec: StudySpec, floor: float | None, *, address: str | None = None) -> Summary:
    """Run a new study to completion."""
    directory = experiment_dir(spec)
    if _exists(posixpath.join(directory, SPEC_FILE)) or _exists(
            posixpath.join(directory, "tuner.pkl")):
        raise StudyExistsError(f"study {spec.name!r} already exists at {directory}; use "
                               f"'dpstudy resume {directory}' or choose another name")
    init_ray(address)
    check_gpu_capacity(spec)
    if spec.reproducible_noise:
        print(f"WARNING [{spec.name}]: {REPRODUCIBLE_NOISE_WARNING}", file=sys.stderr,
              flush=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    save_spec(spec, directory)
    tuner = tune.Tuner(
        make_trainable(spec),
        tune_config=tune.TuneConfig(search_alg=make_search(spec, floor),
                                    scheduler=make_scheduler(spec), num_samples=spec.trials,
                                    reuse_actors=True),
        run_config=run_config(spec))
    return _finish(spec, tuner.fit(), directory)


def resume(directory: str, *, address: str | None = None) -> Summary:
    """Finish an interrupted study from its experiment directory."""
    spec = read_spec(directory)
    init_ray(address)
    check_gpu_capacity(spec)
    if not tune.Tuner.can_restore(directory):
        raise SpecError([f"resume: no Tune experiment state in {directory!r} (the study "
                         f"was stopped before its first trial started; run it again)"])
    tuner = tune.Tuner.restore(directory, trainable=make_trainable(spec),
                               resume_unfinished=True, resume_errored=True)
    return _finish(spec, tuner.fit(), directory)


def _finish(spec: StudySpec, grid: Any, directory: str) -> Summary:
    """Record any trial the callback missed, then summarise the study."""
    callback = StudyCallback(spec)
    callback.setup()
    known = callback.store.trial_ids()
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id")
        # a trial that never reported has no id here; on_trial_error recorded it already
        if trial_id and trial_id not in known:
            error = str(result.error) if result.error else None
            callback.record(trial_id, result.config or {}, result.metrics, error=error)
    rows = callback.store.trials().to_pylist()
    metric, mode = spec.objective.primary
    done = [r for r in rows if r["status"] == "completed" and r.get(metric) is not None]
    best = (max if mode == "max" else min)(done, key=lambda r: r[metric]) if done else None
    count = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "failed")}
    return Summary(name=spec.name, experiment=directory, results=spec.results_path,
                   best=best, **count)

