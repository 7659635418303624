"""The Ray cluster a study runs on: connect (or start an embedded Ray on 127.0.0.1), and
refuse, before anything is written, a trial that no node could ever hold.
"""

from __future__ import annotations

import contextlib
import os

from study.spec.model import SpecError, StudySpec
from trainables.compat import autoscaler_cluster_config, snapshot_on_change
from trainables.placement import ALLOC_CONF


def init_ray(address: str | None = None) -> None:
    """Connect to a cluster at ``address``, or start an embedded one on 127.0.0.1. A process
    already attached to Ray stays attached, unless ``address`` names another cluster."""
    import ray

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Snapshot Tune's experiment state at every controller step (default "auto": every
    # 10 s or more). After a kill -9 a resume then knows every trial that started, finished
    # or checkpointed before the kill, so it neither re-runs finished trials nor restarts
    # running ones from scratch. Read when the Tuner is built, so setting it here suffices.
    # A step in which no trial changed is not snapshotted (nothing a resume needs changed).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    snapshot_on_change()
    if not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF  # inherited by local workers
    if ray.is_initialized():
        if not other_cluster(address):
            return
        ray.shutdown()  # asked for another cluster than this process is attached to
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        return
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (loopback only) must be set before Ray is
    # imported; the CLI does that for local runs. address="local": always a new embedded
    # Ray; with None, ray.init attaches to whatever cluster `ray start` last started on
    # this machine (/tmp/ray/ray_current_cluster), someone else's included.
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")


def other_cluster(address: str | None) -> bool:
    """Whether ``address`` (``host:port`` of a GCS) names another cluster than the one this
    process is attached to (a library caller, or a test, that used Ray before)."""
    import ray

    if not address or address == "auto" or "://" in address:
        return False
    try:
        current = ray.get_runtime_context().gcs_address
    except (AttributeError, RuntimeError):
        return False
    return bool(current) and gcs_endpoint(current) != gcs_endpoint(address)


def gcs_endpoint(address: str) -> tuple[str, str]:
    """``(ip, port)`` of a ``host:port`` address, the host name resolved when it can be."""
    import socket

    host, _, port = address.rpartition(":")
    with contextlib.suppress(OSError):
        host = socket.gethostbyname(host)
    return host, port


def node_capacity(resource: str) -> tuple[list[float], dict[str, float]]:
    """``resource`` (``CPU``, ``GPU``) of each live node, and of each node type the
    autoscaler may still start."""
    import ray

    nodes = [float(n.get("Resources", {}).get(resource, 0)) for n in ray.nodes()
             if n.get("Alive")]
    # the autoscaler's node types, if it runs
    groups = getattr(autoscaler_cluster_config(), "node_group_configs", None) or []
    return nodes, {g.name: float(g.resources.get(resource, 0)) for g in groups
                   if g.max_count != 0}


def check_capacity(spec: StudySpec) -> None:
    """Fail fast when no node, now or after autoscaling, could ever hold one trial's CPUs
    or GPUs (Tune would leave every trial pending), naming each resource that fails."""
    problems = []
    for field, resource in (("cpu", "CPU"), ("gpu", "GPU")):
        wanted = getattr(spec.resources_per_trial, field)
        if wanted <= 0:
            continue
        nodes, types = node_capacity(resource)
        if max([*nodes, *types.values()], default=0.0) < wanted:
            problems.append(
                f"resources_per_trial.{field}: each trial asks for {wanted:g} {resource}(s) "
                f"on one node, but no node of this cluster can ever offer that ({resource}s "
                f"per live node: {nodes}; autoscaler node types: {types or 'none'}); its "
                f"trials would wait forever (got {wanted!r})")
    if problems:
        raise SpecError(problems)
