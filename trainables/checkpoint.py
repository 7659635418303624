"""Per-epoch checkpoints that let a trial resume exactly where it stopped.

A checkpoint is one file, ``checkpoint.pt``, in a directory (the directory is what Ray
Tune persists). It holds everything that changes during training: model and optimizer
state, pruning masks, the accountant's history, every random generator, the step and
epoch counters, the per-epoch metrics so far and the privacy plan. Restoring the
accountant (not restarting it) is what keeps a resumed trial's final epsilon equal to an
uninterrupted one's. Written to a temporary file and renamed, so a crash mid-write
leaves the previous checkpoint intact.

A checkpoint is *private*: its noise and sampler generator states (and their secret seed)
let whoever reads it regenerate the DP noise (see :mod:`trainables.randomness`). Keep it
where the training data is kept; release the model weights, never the checkpoint. So it is
created 0600 in a 0700 folder whatever the umask (:func:`save`, its temporary file too),
and :func:`private_files` gives the copies Ray Tune makes of it the same modes.

:func:`load` raises :class:`CheckpointError` (naming the file and the problem) for a
missing, truncated, garbage or foreign file; :func:`check_compatible` refuses a
checkpoint written by a different trial configuration.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from trainables.accounting import PrivacyPlan
from trainables.errors import InputError
from trainables.randomness import generator_records, restore_generators

FILENAME = "checkpoint.pt"
FORMAT_VERSION = 2  # 2: generators stored with their device and seed
#: Config fields that may change between a run and its resume (they do not change results).
RESUMABLE_CHANGES = ("checkpoint_dir", "device", "eval_batch_size", "optim.physical_batch_size")
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600  # owner only
_KEYS = ("model", "optimizer", "accountant", "masks", "selector", "rng", "progress", "plan",
         "config")


class CheckpointError(InputError, ValueError):
    """A checkpoint that cannot be resumed: the message names the file and the problem."""


@dataclass
class Progress:
    """Where a trial stands: counters, metrics so far and time spent in earlier runs."""

    step: int = 0
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0


def rng_state(generators: dict[str, torch.Generator], seeds: dict[str, int]) -> dict[str, Any]:
    """The named generators (device, seed, state) plus the global Python, NumPy and torch
    (CPU) RNGs."""
    return {"generators": generator_records(generators, seeds),
            "_python": random.getstate(), "_numpy": np.random.get_state(),
            "_torch": torch.get_rng_state()}


def set_rng_state(generators: dict[str, torch.Generator], state: dict[str, Any], *,
                  step: int) -> list[str]:
    """Inverse of :func:`rng_state`; returns the generators re-derived for another device
    type (see :func:`trainables.randomness.restore_generators`)."""
    rederived = restore_generators(generators, state["generators"], step=step)
    random.setstate(state["_python"])
    np.random.set_state(state["_numpy"])
    torch.set_rng_state(state["_torch"])
    return rederived


def save(directory: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         accountant: Any, masks: dict[str, torch.Tensor], selector_state: dict[str, Any],
         generators: dict[str, torch.Generator], seeds: dict[str, int], progress: Progress,
         plan: PrivacyPlan, config: dict[str, Any],
         ema_state: dict[str, Any] | None = None) -> str:
    """Write a checkpoint into ``directory`` atomically, readable by its owner only (file
    0600, ``directory`` made 0700); returns the directory.

    ``ema_state`` is the parameter average (:mod:`trainables.ema`), when the trial keeps
    one."""
    os.makedirs(directory, mode=PRIVATE_DIR, exist_ok=True)
    os.chmod(directory, PRIVATE_DIR)
    payload = {
        "format": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "accountant": accountant.state_dict(),
        "masks": {k: v.cpu() for k, v in masks.items()},
        "selector": selector_state,
        "rng": rng_state(generators, seeds),
        "progress": asdict(progress),
        "plan": asdict(plan),
        "config": config,
        "ema": ema_state,
    }
    tmp = os.path.join(directory, f".{FILENAME}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a killed run of this pid: O_EXCL below needs it gone
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)  # whatever the umask
    with os.fdopen(fd, "wb") as out:
        torch.save(payload, out)
    os.replace(tmp, os.path.join(directory, FILENAME))
    return directory


def remove_temporaries(directory: str) -> None:
    """Delete the temporary files :func:`save` leaves in ``directory`` when killed."""
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(f".{FILENAME}.tmp-"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))


@contextlib.contextmanager
def private_files() -> Iterator[None]:
    """Within: files and folders this process creates are its owner's only (umask 077), so
    the copies of a checkpoint that Ray Tune makes (into the experiment directory, or back
    for a resume) are 0600 in 0700 folders whatever the user's umask. Process-wide: use it
    around code that creates nothing that must be shared."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def load(directory: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save` (tensors on the CPU); raises
    :class:`CheckpointError` for a missing, unreadable or foreign file."""
    path = os.path.join(directory, FILENAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 (zip, pickle, EOF, ...: all mean unreadable)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path}: not a readable dpstudy checkpoint "
                              f"(truncated or corrupt: {reason})") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"checkpoint {path}: not a dpstudy checkpoint (no format field)")
    if payload["format"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format {payload['format']!r} is not "
                              f"supported (expected {FORMAT_VERSION})")
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path}: incomplete, missing {missing}")
    return payload


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       prefix: str = "") -> list[str]:
    """``"field: checkpoint has A, this run B"`` for every differing (nested) field, except
    :data:`RESUMABLE_CHANGES`."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if name in RESUMABLE_CHANGES:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_differences(a, b, prefix=f"{name}."))
        elif a != b:
            out.append(f"{name}: checkpoint has {a!r}, this run {b!r}")
    return out


def check_compatible(state: dict[str, Any], config: dict[str, Any], directory: str) -> None:
    """Refuse to resume ``state`` under a different trial ``config`` (naming the fields)."""
    diffs = config_differences(state["config"], config)
    if diffs:
        path = os.path.join(directory, FILENAME)
        raise CheckpointError(f"checkpoint {path}: written by a different trial "
                              f"configuration; refusing to resume ({'; '.join(diffs)})")


def is_finished(state: dict[str, Any]) -> bool:
    """Whether the checkpointed trial already took every step of its privacy plan."""
    return state["progress"]["step"] >= state["plan"]["steps"]


def exists(directory: str | None) -> bool:
    """Whether ``directory`` holds a checkpoint."""
    return bool(directory) and os.path.isfile(os.path.join(directory, FILENAME))
