"""Studies on a Ray cluster through the Ray Jobs API: submit, list, logs, stop.

``dpstudy submit SPEC --address http://HEAD:8265`` validates the spec here, stages the
project code and the spec as the job's ``runtime_env`` working directory, and submits
``python -m study.cli run SPEC --address auto`` as a Ray Job, which drives the study on
the head node. It returns at once with the job id (``dpstudy-NAME-TIMESTAMP``).

Token authentication stays on: clients send the token from ``~/.ray/auth_token`` (or
``RAY_AUTH_TOKEN``) with ``RAY_AUTH_MODE=token``, which this module sets by default.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from study.spec.model import StudySpec, load_spec
from trainables.errors import FailureError

JOB_SPEC = "dpstudy-submitted-spec.yaml"
METADATA_KEY = "dpstudy_study"
AGENT_WAIT_S = 60.0
ENV_VARS = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "RAY_AIR_NEW_OUTPUT": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


class ClusterError(FailureError, RuntimeError):
    """The cluster could not be reached, refused our token, or refused the request."""


def client(address: str) -> Any:
    """A ``JobSubmissionClient`` for ``address``, with errors a user can act on."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # noqa: BLE001 - Ray raises several types here
        raise cluster_error(address, err) from None


def cluster_error(address: str, err: Exception) -> ClusterError:
    """Turn Ray's connection and authentication failures into one clear message."""
    text = str(err)
    first = text.splitlines()[0] if text else type(err).__name__
    if "Authentication" in text or "401" in text or "403" in text or "token" in text.lower():
        return ClusterError(
            f"address: the Ray cluster at {address} rejected our authentication token "
            f"({first}). Set RAY_AUTH_MODE=token and put the cluster's token "
            f"in ~/.ray/auth_token (or RAY_AUTH_TOKEN); copy it from the head node's "
            f"~/.ray/auth_token.")
    if "status code" in text:
        return ClusterError(f"address: the Ray Jobs API at {address} refused the request "
                            f"({first})")
    return ClusterError(f"address: cannot reach the Ray Jobs API at {address} ({first}); "
                        f"is the cluster up and the dashboard port (8265) forwarded?")


def cluster_spec(spec: StudySpec) -> StudySpec:
    """Relative local results paths mean nothing on a cluster: keep them under storage."""
    results = spec.results
    if "://" in results or results.startswith(("/", "~")):
        return spec
    storage = spec.storage.rstrip("/")
    return spec.model_copy(update={"results": f"{storage}/{spec.name}/results"})


def stage(directory: str, spec: StudySpec | None = None) -> None:
    """Copy the project packages (and the spec, if any) into the job's working dir."""
    import yaml

    import study
    import trainables

    for package in (study, trainables):
        source = Path(package.__file__).parent
        shutil.copytree(source, Path(directory) / source.name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if spec is not None:
        text = yaml.safe_dump(spec.to_dict(), sort_keys=False)
        (Path(directory) / JOB_SPEC).write_text(text, encoding="utf-8")


def submit(spec_path: str, address: str, *, python: str = "python") -> tuple[str, StudySpec]:
    """Submit a study as a Ray Job; returns (job id, the spec as submitted).

    The job runs ``PYTHON -m study.cli run ...`` on the head node: ``python`` must be the
    interpreter that has dpstudy's dependencies there (as in ``cluster.yaml``), or name it.
    """
    spec = cluster_spec(load_spec(spec_path))
    return _submit(address, python, f"run {JOB_SPEC}", spec.name, spec), spec


def submit_resume(experiment: str, address: str, *, python: str = "python") -> str:
    """Submit ``dpstudy resume EXPERIMENT`` as a Ray Job (the driver died on the head)."""
    name = experiment.rstrip("/").rsplit("/", 1)[-1]
    return _submit(address, python, f"resume {shlex.quote(experiment)}", name, suffix="-resume")


def _submit(address: str, python: str, command: str, name: str, spec: StudySpec | None = None,
            *, suffix: str = "") -> str:
    entrypoint = f"{shlex.quote(python)} -m study.cli {command} --address auto"
    job_id = f"dpstudy-{name}{suffix}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"
    jobs = client(address)
    with tempfile.TemporaryDirectory(prefix="dpstudy-job-") as work:
        stage(work, spec)
        metadata = {METADATA_KEY: name}
        if spec is not None:
            metadata.update(storage=spec.storage, results=spec.results)
        runtime_env = {"working_dir": work, "env_vars": ENV_VARS}
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return jobs.submit_job(entrypoint=entrypoint, submission_id=job_id,
                                       runtime_env=runtime_env, metadata=metadata)
            except Exception as err:  # noqa: BLE001 - Ray raises several types here
                # a head that just started has no job agent yet: Ray asks us to retry
                if "try again later" not in str(err) or time.monotonic() > deadline:
                    raise cluster_error(address, err) from None
                time.sleep(2)


def _request(address: str, method: str, *args: Any) -> Any:
    """``JobSubmissionClient.<method>(*args)`` on ``address``, Ray's failures turned into a
    :class:`ClusterError`."""
    jobs = client(address)
    try:
        return getattr(jobs, method)(*args)
    except Exception as err:  # noqa: BLE001 - Ray raises several types here
        raise cluster_error(address, err) from None


def list_studies(address: str) -> list[dict[str, Any]]:
    """Submitted studies, newest first: id, study, status, times, results location."""
    rows = [{"job_id": job.submission_id, "study": job.metadata[METADATA_KEY],
             "status": str(getattr(job.status, "value", job.status)),
             "start_time": job.start_time, "results": job.metadata.get("results")}
            for job in _request(address, "list_jobs") if METADATA_KEY in (job.metadata or {})]
    return sorted(rows, key=lambda r: r["start_time"] or 0, reverse=True)


def logs(address: str, job_id: str) -> str:
    """Everything the study's driver has printed so far."""
    return _request(address, "get_job_logs", job_id)


def stop(address: str, job_id: str) -> bool:
    """Ask Ray to stop a submitted study (``dpstudy resume`` can finish it later)."""
    return bool(_request(address, "stop_job", job_id))
