"""Per-epoch checkpoints that let a trial resume exactly where it stopped.

A checkpoint is one file, ``checkpoint.pt``, in a directory (the directory is what Ray
Tune persists). It holds everything that changes during training: model and optimizer
state, pruning masks, the accountant's history, every random generator, the step and
epoch counters, the per-epoch metrics so far and the privacy plan. Restoring the
accountant (not restarting it) is what keeps a resumed trial's final epsilon equal to an
uninterrupted one's. Written to a temporary file and renamed, so a crash mid-write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from trainables.accounting import PrivacyPlan

FILENAME = "checkpoint.pt"
FORMAT_VERSION = 1


@dataclass
class Progress:
    """Where a trial stands: counters, metrics so far and time spent in earlier runs."""

    step: int = 0
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """States of the named generators plus the global Python, NumPy and torch RNGs."""
    state: dict[str, Any] = {name: g.get_state() for name, g in generators.items()}
    state["_python"] = random.getstate()
    state["_numpy"] = np.random.get_state()
    state["_torch"] = torch.get_rng_state()
    return state


def set_rng_state(generators: dict[str, torch.Generator], state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    for name, g in generators.items():
        g.set_state(state[name])
    random.setstate(state["_python"])
    np.random.set_state(state["_numpy"])
    torch.set_rng_state(state["_torch"])


def save(directory: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         accountant: Any, masks: dict[str, torch.Tensor], selector_state: dict[str, Any],
         generators: dict[str, torch.Generator], progress: Progress, plan: PrivacyPlan,
         config: dict[str, Any]) -> str:
    """Write a checkpoint into ``directory`` atomically; returns the directory."""
    os.makedirs(directory, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "accountant": accountant.state_dict(),
        "masks": {k: v.cpu() for k, v in masks.items()},
        "selector": selector_state,
        "rng": rng_state(generators),
        "progress": asdict(progress),
        "plan": asdict(plan),
        "config": config,
    }
    tmp = os.path.join(directory, f".{FILENAME}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, os.path.join(directory, FILENAME))
    return directory


def load(directory: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save` (tensors on the CPU)."""
    path = os.path.join(directory, FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no {FILENAME} in {directory!r}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint: format {payload.get('format')!r} in {path!r} is not "
                         f"supported (expected {FORMAT_VERSION})")
    return payload


def exists(directory: str | None) -> bool:
    """Whether ``directory`` holds a checkpoint."""
    return bool(directory) and os.path.isfile(os.path.join(directory, FILENAME))
