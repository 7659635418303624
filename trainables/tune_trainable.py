"""The edge between one trial and Ray Tune: the only module of ``trainables`` that imports Ray.

:func:`run_trial` is called inside a Tune function trainable. It resumes from the
checkpoint Tune hands back after a failure (a lost node, a killed driver), trains, and
reports each epoch with its checkpoint (Tune's copies of it, like the checkpoint itself,
readable by their owner only: see :func:`trainables.checkpoint.private_files`). Because
the checkpoint carries the accountant's history and the step counter, a retried trial
continues its privacy budget rather than restarting it, and never takes more steps than
its plan allows.

Each report also carries ``epoch_history`` (all epochs so far, as JSON), so that whoever
records results sees every epoch even when some were reported before a restart, and the
trial's resolved configuration (:data:`CONFIG_KEY`, see :func:`reported_config`), which is
what the driver records as the trial's settings. A trial
resumed from a checkpoint that already holds its whole plan (the driver stopped after the
trial stored its last epoch but before it saw the report) trains nothing and reports that
last epoch again, so that Tune's last result is the finished one.

Placement (see :mod:`trainables.placement`): ``device: auto`` follows the GPUs Ray
assigned to this trial (``ray.get_gpu_ids()``), a fractional GPU share caps the process'
GPU memory, the allocator is asked for expandable segments before CUDA is first used, and
cached GPU memory is released when the trial ends (the process lives on with
``reuse_actors``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

from trainables import checkpoint, placement
from trainables.compat import trial_storage
from trainables.config import TrialConfig
from trainables.train import train

CHECKPOINT_DIR = re.compile(r"checkpoint_\d{6}")
#: the trial's own checkpoint folder, in its folder of a local storage
OWN_CHECKPOINT = "dpstudy-checkpoint"
#: key of the trial's resolved configuration (JSON) in every report
CONFIG_KEY = "trial_config"


def run_trial(trial_config: dict[str, Any], *, cost_per_second: float = 1.0) -> dict[str, Any]:
    """Run one trial under Ray Tune; returns its final metrics.

    ``trial_cost`` (reported alongside) is wall time x ``cost_per_second``, e.g. the
    resources the trial holds, so studies can trade accuracy against cost."""
    with checkpoint.private_files():  # Tune's copies of the checkpoints are private too
        return _run_trial(trial_config, cost_per_second)


def _run_trial(trial_config: dict[str, Any], cost_per_second: float) -> dict[str, Any]:
    import ray
    from ray import tune

    resolved = reported_config(trial_config)  # a bad config fails here, before any work
    placement.prepare_allocator()  # before this process first touches CUDA
    assigned_gpus = list(ray.get_gpu_ids())
    gpu_share = ray.get_runtime_context().get_assigned_resources().get("GPU")
    work = tempfile.mkdtemp(prefix="dpstudy-trial-")
    storage = trial_storage()
    handed_back = tune.get_checkpoint()
    resume_dir = newest_checkpoint(_candidates(handed_back, storage), work,
                                   required=handed_back is not None)
    history = _earlier_epochs(resume_dir)
    resumed_epochs = len(history)

    def send(checkpoint_dir: str | None) -> None:
        metrics = history[-1]
        payload = {**metrics, "trial_cost": metrics["wall_time_s"] * cost_per_second,
                   "epoch_history": json.dumps(history), CONFIG_KEY: resolved}
        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(payload, checkpoint=ckpt)

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        history.append(metrics)
        send(checkpoint_dir)

    own = own_checkpoint_dir(storage) or os.path.join(work, "checkpoint")
    checkpoint.remove_temporaries(own)  # of a run killed while it wrote one
    config = {**trial_config, "checkpoint_dir": own}
    device = placement.choose_device(config.get("device", "auto"), assigned_gpus=assigned_gpus)
    placement.claim_gpu_share(device, gpu_share)
    try:
        final = train(config, report=report, resume_from=resume_dir,
                      assigned_gpus=assigned_gpus)
        if history and len(history) == resumed_epochs:
            # resumed from a checkpoint that already holds the whole plan (the driver
            # stopped before it saw the last report): say it again, so that Tune's last
            # result is the finished one and the trial is not recorded as stopped early
            send(resume_dir)
        shutil.rmtree(own, ignore_errors=True)  # every epoch is stored by Tune: redundant
        return final
    except SystemExit:  # Tune stopped the trial (ASHA, Ctrl-C) in a report it had stored
        shutil.rmtree(own, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        placement.release_memory(device)


def reported_config(trial_config: dict[str, Any]) -> str:
    """The trial's resolved configuration (:class:`~trainables.config.TrialConfig`, defaults
    filled in) as the JSON reported under :data:`CONFIG_KEY`: every setting but the local
    ``checkpoint_dir``. Nothing secret: the secret seed of the noise and the batch sampling
    is drawn while training starts and kept only in the private checkpoint
    (:mod:`trainables.randomness`), never in the config."""
    settings = TrialConfig.from_dict(trial_config).to_dict()
    settings.pop("checkpoint_dir", None)
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


def own_checkpoint_dir(storage: tuple[Any, str] | None) -> str | None:
    """Where the trial writes its per-epoch checkpoint: :data:`OWN_CHECKPOINT` in its
    folder when the storage is local, so that a checkpoint written but not yet reported
    (the driver, or the whole machine, killed in between) is found by the next run of the
    trial; None (a temporary folder) for an object store. Written atomically (see
    :func:`trainables.checkpoint.save`); Tune's reported copies are made from it."""
    if storage is None or storage[0].type_name != "local":
        return None
    return os.path.join(storage[1], OWN_CHECKPOINT)


def _candidates(handed_back: Any, storage: tuple[Any, str] | None) -> list[Any]:
    """Checkpoints this trial may continue from: the one Tune hands back, every one stored
    in the trial's folder and the trial's own latest one (a driver killed between a trial's
    checkpoint and its own record of it hands back an older one, or none: the trial would
    redo epochs, or start over, on data it already trained on)."""
    from ray import tune

    found = [handed_back] if handed_back is not None else []
    if storage is None:
        return found
    fs, trial_dir = storage
    known = {c.path for c in found}
    found += [tune.Checkpoint(path, filesystem=fs) for path in stored_checkpoints(fs, trial_dir)
              if path not in known]
    own = own_checkpoint_dir(storage)
    if checkpoint.exists(own):
        found.append(tune.Checkpoint(own, filesystem=fs))
    return found


def stored_checkpoints(fs: Any, trial_dir: str) -> list[str]:
    """Paths of the ``checkpoint_NNNNNN`` folders in ``trial_dir`` (on pyarrow ``fs``)."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(trial_dir))
    except (FileNotFoundError, OSError):
        return []
    return sorted(i.path for i in infos if i.type == pafs.FileType.Directory
                  and CHECKPOINT_DIR.fullmatch(os.path.basename(i.path)))


def newest_checkpoint(candidates: list[Any], work: str, *, required: bool = False) -> str | None:
    """Download each candidate (a ``ray.tune.Checkpoint``) and return the local folder of the
    one furthest along (most DP steps taken). Unreadable ones (cut short by a kill while
    being written, or deleted meanwhile) are skipped; None if there is none. With
    ``required`` (Tune handed one back), a trial never starts over: if none is readable,
    the first one's :class:`~trainables.checkpoint.CheckpointError` is raised."""
    best, best_step, first_error = None, -1, None
    for i, candidate in enumerate(candidates):
        try:
            local = candidate.to_directory(os.path.join(work, f"resume-{i}"))
            step = checkpoint.load(local)["progress"]["step"]
        except (checkpoint.CheckpointError, OSError) as err:
            first_error = first_error or err
            continue
        if step > best_step:
            best, best_step = local, step
    if best is None and required and first_error is not None:
        raise first_error
    return best


def _earlier_epochs(resume_dir: str | None) -> list[dict[str, Any]]:
    """Epochs reported before the last restart, as recorded in the checkpoint."""
    if not resume_dir:
        return []
    return list(checkpoint.load(resume_dir)["progress"]["history"])
