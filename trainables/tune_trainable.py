"""The edge between one trial and Ray Tune: the only module of ``trainables`` that imports Ray.

:func:`run_trial` is called inside a Tune function trainable. It resumes from the
checkpoint Tune hands back after a failure (a lost node, a killed driver), trains, and
reports each epoch with its checkpoint. Because the checkpoint carries the accountant's
history and the step counter, a retried trial continues its privacy budget rather than
restarting it, and never takes more steps than its plan allows.

Each report also carries ``epoch_history`` (all epochs so far, as JSON), so that whoever
records results sees every epoch even when some were reported before a restart.

Placement (see :mod:`trainables.placement`): ``device: auto`` follows the GPUs Ray
assigned to this trial (``ray.get_gpu_ids()``), a fractional GPU share caps the process'
GPU memory, the allocator is asked for expandable segments before CUDA is first used, and
cached GPU memory is released when the trial ends (the process lives on with
``reuse_actors``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from trainables import placement
from trainables.train import train


def run_trial(trial_config: dict[str, Any], *, cost_per_second: float = 1.0) -> dict[str, Any]:
    """Run one trial under Ray Tune; returns its final metrics.

    ``trial_cost`` (reported alongside) is wall time x ``cost_per_second``, e.g. the
    resources the trial holds, so studies can trade accuracy against cost."""
    import ray
    from ray import tune

    placement.prepare_allocator()  # before this process first touches CUDA
    assigned_gpus = list(ray.get_gpu_ids())
    gpu_share = ray.get_runtime_context().get_assigned_resources().get("GPU")
    work = tempfile.mkdtemp(prefix="dpstudy-trial-")
    resume_dir = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume_dir = checkpoint.to_directory(os.path.join(work, "resume"))
    history = _earlier_epochs(resume_dir)

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        history.append(metrics)
        payload = {**metrics, "trial_cost": metrics["wall_time_s"] * cost_per_second,
                   "epoch_history": json.dumps(history)}
        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(payload, checkpoint=ckpt)

    config = {**trial_config, "checkpoint_dir": os.path.join(work, "checkpoint")}
    device = placement.choose_device(config.get("device", "auto"), assigned_gpus=assigned_gpus)
    placement.claim_gpu_share(device, gpu_share)
    try:
        return train(config, report=report, resume_from=resume_dir,
                     assigned_gpus=assigned_gpus)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        placement.release_memory(device)


def _earlier_epochs(resume_dir: str | None) -> list[dict[str, Any]]:
    """Epochs reported before the last restart, as recorded in the checkpoint."""
    if not resume_dir:
        return []
    from trainables import checkpoint

    return list(checkpoint.load(resume_dir)["progress"]["history"])
