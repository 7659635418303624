"""``dpstudy audit``: audit the mechanism of a study's trial, empirically, in one run.

The target (a spec, a results directory or an experiment directory) resolves to a trial
config: with ``--trial ID`` or ``--best`` the recorded trial's, else the spec's fixed
configuration (only when it searches nothing). Everything is checked before
:func:`trainables.audit.run_audit` runs as a Ray task with the spec's per-trial resources;
its row is appended to ``audits.parquet`` next to the study's results.

The audited run reproduces the recorded trial from its ``params`` column and its seed,
through the same calibrator, so it plans the same steps and noise; a trial stopped early is
audited for its full plan. Rows written before ``params`` existed are rebuilt from their
recorded noise multiplier and steps instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from study.analysis import selection
from study.spec.model import StudySpec, check_against_data, load_spec
from study.storage.audits import append_audit
from study.storage.read import read_trials
from trainables.audit import AuditConfig, AuditUnavailableError, require_auditing
from trainables.config import TrialConfig


@dataclass(frozen=True)
class Target:
    """What to audit: the study, the trial (None = the spec's fixed config), its config."""

    spec: StudySpec
    results: str
    trial_id: str | None
    config: dict[str, Any]


def resolve(target: str, *, trial: str | None = None, best: bool = False,
            study: str | None = None) -> Target:
    """A spec path, results directory or experiment directory, plus ``--trial``/``--best``,
    as a :class:`Target`."""
    from study.storage.experiment import find_spec

    location = os.path.expanduser(target)
    if location.endswith((".yaml", ".yml")):
        spec, results = load_spec(location), None
    else:
        spec, results = find_spec(location, study), None
        with contextlib.suppress(FileNotFoundError):  # a directory of results, or not
            read_trials(location)
            results = location
    results = results or spec.results_path
    if trial is None and not best:
        try:
            return Target(spec, results, None, spec.trial_config())
        except ValueError as err:
            raise ValueError(f"audit: {err}; give --trial ID or --best to audit a trial "
                             f"of {results}") from None
    row = _pick_row(results, spec, trial)
    return Target(spec, results, row["trial_id"], trial_config_of(spec, row))


def _pick_row(results: str, spec: StudySpec, trial: str | None) -> dict[str, Any]:
    rows = [r for r in read_trials(results).to_pylist() if r["study"] == spec.name]
    if trial is not None:
        found = next((r for r in rows if r["trial_id"] == trial), None)
        if found is None:
            known = ", ".join(sorted(r["trial_id"] for r in rows)[:10]) or "none"
            raise ValueError(f"audit: --trial: no trial {trial!r} in {results} "
                             f"(known: {known})")
        return found
    metric, mode = spec.objective.primary
    chosen = selection.best(rows, metric, mode)
    if chosen is None:
        raise ValueError(f"audit: --best: no completed search trial with {metric} in "
                         f"{results}")
    return chosen


def trial_config_of(spec: StudySpec, row: dict[str, Any]) -> dict[str, Any]:
    """The trial config of a recorded trial: its sampled ``params`` and seed through the
    spec, as a confirmation re-trains it; for rows written before ``params`` existed, the
    recorded noise multiplier, hyperparameters and steps (see module doc)."""
    seed = row["seed"] if row.get("seed") is not None else spec.seed
    if row.get("params"):
        return spec.trial_config(json.loads(row["params"]), seed=seed)
    epochs = row["steps"] * row["sample_rate"]
    recorded = {**row, "max_epochs": epochs, "epochs": epochs}
    params = {k: recorded[k] for k in spec.parameters() if recorded.get(k) is not None}
    config = spec.trial_config(params, seed=seed)
    config["privacy"] = {**config["privacy"], "noise_multiplier": row["noise_multiplier"],
                         "epochs": None}
    config["optim"] = {**config["optim"], "max_epochs": epochs}
    return config


def prepare(target: Target) -> None:
    """Everything an audit needs, checked before it starts (the audit settings were
    checked when :class:`AuditConfig` was built); raises on the first gap."""
    require_auditing()
    check_against_data(target.spec)
    TrialConfig.from_dict(target.config)


def run_remote(target: Target, settings: AuditConfig, *,
               address: str | None = None) -> dict[str, Any]:
    """Run the audit as a Ray task with the spec's per-trial resources."""
    import ray

    from study.execution.cluster import init_ray

    init_ray(address)
    resources = target.spec.resources_per_trial
    task = ray.remote(num_cpus=resources.cpu, num_gpus=resources.gpu,
                      max_retries=0)(audit_task)
    try:
        return ray.get(task.remote(target.config, settings))
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, AuditUnavailableError):
            raise AuditUnavailableError(f"{err.cause} (on the Ray worker)") from None
        raise


def audit_task(config: dict[str, Any], settings: AuditConfig) -> dict[str, Any]:
    """The Ray task: one audit run; returns its result plus the node's host name."""
    from trainables.audit import run_audit

    return {**run_audit(config, settings).to_dict(), "node": socket.gethostname()}


def record(target: Target, settings: AuditConfig, result: dict[str, Any]) -> dict[str, Any]:
    """Append the audit's row to ``audits.parquet`` next to the study's results."""
    cfg = TrialConfig.from_dict(target.config)
    row = {
        "study": target.spec.name, "audit_id": uuid.uuid4().hex[:12],
        "trial_id": target.trial_id, "epsilon_target": cfg.privacy.epsilon,
        "violation": int(result["epsilon_audited"] > result["epsilon_claimed"]),
        "clip_norm": cfg.optim.clip_norm, "prune_rate": cfg.pruning.rate,
        "drop_rate": cfg.dropping.rate, "seed": settings.seed, **result,
    }
    return append_audit(target.results, row)


def format_row(row: dict[str, Any]) -> str:
    """The printed report of one audit: claimed vs audited epsilon, m, confidence."""
    what = f"trial {row['trial_id']}" if row["trial_id"] else "the spec's configuration"
    verdict = ("VIOLATION: the audited lower bound exceeds the claim"
               if row["violation"] else "consistent with the claim")
    return (f"[{row['study']}] {row['mode']} audit of {what}: claimed epsilon "
            f"{row['epsilon_claimed']:.3f} (target {row['epsilon_target']:g}, delta "
            f"{row['delta']:g}), audited lower bound {row['epsilon_audited']:.3f} at "
            f"confidence {row['confidence']:g} with m={row['canaries']} canaries "
            f"({row['included']} included); {verdict}. {row['steps']} steps, "
            f"{row['wall_time_s']:.1f} s on {row['node']}; audit {row['audit_id']}")
