"""One trial: DP-SGD at a fixed privacy budget, with pre-pruning and gradient dropping.

``train(config, report=...)`` reads top to bottom as the pipeline does:

1. seed everything; load the data (private train split, validation split for selection, test
   split for reporting, optional public);
2. calibrate: the accountant turns (epsilon, delta, sigma, q) into a number of steps T;
3. build the model and pre-prune it (masks, or a physically smaller network);
4. wrap it for per-sample gradients and build the masked DP optimizer and its selector
   (and the parameter average, with ``optim.ema_decay``);
5. resume from a checkpoint if one is given;
6. train T Poisson-sampled steps, one epoch (ceil(1/q) steps) at a time, each logical batch
   in physical chunks with its augmentation views (:mod:`trainables.logical_batch`); after
   each epoch evaluate (validation and test; the averaged weights with EMA), checkpoint
   and report.

``report(metrics, checkpoint_dir)`` is called once per epoch; the Ray Tune edge
(:mod:`trainables.tune_trainable`) forwards it to ``ray.tune.report``.

Note: ``train_loss`` is measured on the private training batches and is not itself
protected by the DP guarantee; it is a diagnostic. Validation metrics (``val_*``) are what a
study selects on; test metrics (``test_*``) are for reporting the selected configuration.
Validation metrics computed on private examples are not themselves DP releases.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import IAccountant, create_accountant
from opacus.validators import ModuleValidator
from torch import nn

from trainables import checkpoint, placement, precision
from trainables.accounting import PrivacyPlan, cached_plan, steps_per_epoch
from trainables.augment import augmentation_for
from trainables.config import OptimConfig, TrialConfig
from trainables.data import Datasets, Split, load_datasets
from trainables.dp_score import dp_accuracy
from trainables.dropping import Selector, make_selector
from trainables.ema import ParameterAverage
from trainables.logical_batch import Batching, logical_step
from trainables.models import build_model
from trainables.optimizer import MaskedDPOptimizer
from trainables.pruning import PruneResult, apply_masks, prune
from trainables.randomness import make_generators

Reporter = Callable[[dict[str, Any], "str | None"], None]


@dataclass
class Run:
    """Everything built for a trial, in the order it is built."""

    config: TrialConfig
    device: torch.device
    data: Datasets
    plan: PrivacyPlan
    pruned: PruneResult
    model: GradSampleModule
    optimizer: MaskedDPOptimizer
    selector: Selector | None
    accountant: IAccountant
    generators: dict[str, torch.Generator]
    seeds: dict[str, int]  # private: the noise and sampler seeds are secret
    batching: Batching  # physical chunks, augmentation views, precision
    ema: ParameterAverage | None = None  # the parameter average (optim.ema_decay)

    @contextlib.contextmanager
    def evaluated_weights(self) -> Iterator[None]:
        """Within the block the model holds the weights evaluation and release use: the
        parameter average with ``optim.ema_decay``, else the trained weights."""
        if self.ema is None:
            yield
        else:
            with self.ema.applied(self.model._module):
                yield


def train(config: TrialConfig | dict[str, Any], *, report: Reporter | None = None,
          resume_from: str | None = None,
          assigned_gpus: list[Any] | None = None) -> dict[str, Any]:
    """Train one trial and return its final metrics (the last epoch's report).

    ``assigned_gpus`` is what a scheduler gave the trial (``device: auto`` follows it)."""
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    saved = checkpoint.load(resume_from) if resume_from else None
    if saved is not None:
        checkpoint.check_compatible(saved, cfg.to_dict(), resume_from)
    run = build_run(cfg, assigned_gpus=assigned_gpus)
    progress = restore(run, resume_from, saved) if resume_from else checkpoint.Progress()
    ckpt_dir = cfg.checkpoint_dir or tempfile.mkdtemp(prefix="dpstudy-ckpt-")
    per_epoch = steps_per_epoch(run.plan.sample_rate)
    metrics = progress.history[-1] if progress.history else {}
    while progress.step < run.plan.steps:
        started = time.perf_counter()
        n_steps = min(per_epoch, run.plan.steps - progress.step)
        train_loss, samples, train_s, kept = train_epoch(run, n_steps)
        progress.step += n_steps
        progress.epoch += 1
        with run.evaluated_weights():
            scores = evaluate_splits(run)
        progress.elapsed_s += time.perf_counter() - started
        metrics = epoch_metrics(run, progress, train_loss=train_loss, scores=scores,
                                samples_per_s=samples / train_s, kept=kept)
        if progress.step >= run.plan.steps:
            with run.evaluated_weights():
                metrics |= release_dp_score(run)
        progress.history.append(metrics)
        save_checkpoint(run, progress, ckpt_dir)
        if report is not None:
            report(metrics, ckpt_dir)
    return metrics


# --- 1-4: build ---------------------------------------------------------------------

def build_run(cfg: TrialConfig, *, assigned_gpus: list[Any] | None = None,
              optimizer_cls: type[MaskedDPOptimizer] = MaskedDPOptimizer) -> Run:
    """Seed, load data, calibrate the budget, build, prune and wrap the model.

    ``assigned_gpus`` is what a scheduler gave the trial (``device: auto`` follows it);
    ``optimizer_cls`` is a :class:`MaskedDPOptimizer` subclass (the audit's canary optimizer,
    or a test's sabotaged one); training itself always uses the default."""
    seed_everything(cfg.seed)
    placement.set_determinism(cfg.deterministic)
    device = placement.choose_device(cfg.device, assigned_gpus=assigned_gpus)
    if device.type == "cpu":
        placement.keep_freed_host_memory()
    precision.check_precision(cfg.precision, device)
    data = load_datasets(cfg.dataset, seed=cfg.seed).to(device)
    sample_rate = cfg.optim.batch_size / data.nominal_train  # public n, not the split's
    plan = cached_plan(cfg.privacy, sample_rate=sample_rate, max_epochs=cfg.optim.max_epochs)
    generators, seeds = make_generators(cfg.seed, device,
                                        reproducible_noise=cfg.reproducible_noise)
    model = build_model(cfg.model, num_classes=data.num_classes, image_shape=data.image_shape)
    pruned = prune(model, cfg.pruning, public=data.public, generator=generators["pruning"])
    ModuleValidator.validate(pruned.model, strict=True)
    gsm = precision.wrap_model(pruned.model.to(device), cfg.precision)
    selector = make_selector(cfg.dropping, model=gsm, public=data.public,
                             generator=generators["selector"])
    optimizer = make_optimizer(cfg, gsm, pruned, plan, selector, generators["noise"],
                               cls=optimizer_cls)
    accountant = create_accountant(mechanism=plan.accountant)
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    batching = Batching(physical_batch_size=cfg.optim.physical_batch_size,
                        multiplicity=cfg.optim.augmentation_multiplicity,
                        augmentation=augmentation_for(cfg.dataset.name),
                        generator=generators["augment"], precision=cfg.precision,
                        device=device)
    ema = (None if cfg.optim.ema_decay is None
           else ParameterAverage(gsm._module, cfg.optim.ema_decay))
    return Run(config=cfg, device=device, data=data, plan=plan, pruned=pruned, model=gsm,
               optimizer=optimizer, selector=selector, accountant=accountant,
               generators=generators, seeds=seeds, batching=batching, ema=ema)


def make_optimizer(cfg: TrialConfig, model: GradSampleModule, pruned: PruneResult,
                   plan: PrivacyPlan, selector: Selector | None,
                   noise_generator: torch.Generator, *,
                   cls: type[MaskedDPOptimizer] = MaskedDPOptimizer) -> MaskedDPOptimizer:
    """The masked DP optimizer (``cls``) over the model's parameters."""
    names = [n.removeprefix("_module.") for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    device = params[0].device
    trainable = [pruned.masks[n].to(device) if n in pruned.masks else None for n in names]
    return cls(
        base_optimizer(cfg.optim, params),
        trainable=trainable if any(t is not None for t in trainable) else None,
        selector=selector, noise_multiplier=plan.noise_multiplier,
        max_grad_norm=cfg.optim.clip_norm, expected_batch_size=cfg.optim.batch_size,
        loss_reduction="mean", generator=noise_generator)


def base_optimizer(cfg: OptimConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The non-private optimizer that applies the privatised gradient."""
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (model initialisation uses torch's global RNG)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- 5: resume ----------------------------------------------------------------------

def restore(run: Run, directory: str,
            state: dict[str, Any] | None = None) -> checkpoint.Progress:
    """Load masks, model, optimizer, accountant, generators and counters from a checkpoint.

    Raises :class:`trainables.checkpoint.CheckpointError` naming the file and the problem
    when the checkpoint belongs to another trial."""
    state = state if state is not None else checkpoint.load(directory)
    where = f"checkpoint {os.path.join(directory, checkpoint.FILENAME)}"
    checkpoint.check_compatible(state, run.config.to_dict(), directory)
    plan = asdict(run.plan)
    diffs = [f"{k}: checkpoint has {state['plan'].get(k)!r}, this run {v!r}"
             for k, v in plan.items() if state["plan"].get(k) != v]
    if diffs:
        raise checkpoint.CheckpointError(f"{where}: its privacy plan differs from this "
                                         f"trial's; refusing to resume ({'; '.join(diffs)})")
    try:
        load_masks(run, state["masks"])
        run.model._module.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.accountant.load_state_dict(state["accountant"])
        if run.selector is not None:
            run.selector.load_state_dict(state["selector"])
        if run.ema is not None:
            run.ema.load_state_dict(state["ema"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise checkpoint.CheckpointError(f"{where}: does not fit this trial's model "
                                         f"({reason}); refusing to resume") from None
    progress = checkpoint.Progress(**state["progress"])
    checkpoint.set_rng_state(run.generators, state["rng"], step=progress.step)
    run.seeds.update({k: r["seed"] for k, r in state["rng"]["generators"].items()})
    return progress


def load_masks(run: Run, masks: dict[str, torch.Tensor]) -> None:
    """Use the checkpoint's pruning masks, not this node's re-pruning (which may round
    differently, e.g. SNIP on another device)."""
    if set(masks) != set(run.pruned.masks):
        raise ValueError(f"pruning masks for {sorted(masks)} in the checkpoint, but this "
                         f"trial prunes {sorted(run.pruned.masks)}")
    if not masks:
        return
    run.pruned.masks = {n: m.to(torch.bool) for n, m in masks.items()}
    apply_masks(run.model._module, run.pruned.masks)
    removed = sum(int((~m).sum()) for m in run.pruned.masks.values())
    run.pruned.params_after = run.pruned.params_before - removed
    run.optimizer.set_trainable(
        [run.pruned.masks.get(n.removeprefix("_module.")) for n, _ in
         run.model.named_parameters()])


def save_checkpoint(run: Run, progress: checkpoint.Progress, directory: str) -> str:
    """Checkpoint the run into ``directory``."""
    return checkpoint.save(
        directory, model=run.model._module, optimizer=run.optimizer,
        accountant=run.accountant, masks=run.pruned.masks,
        selector_state=run.selector.state_dict() if run.selector else {},
        generators=run.generators, seeds=run.seeds, progress=progress, plan=run.plan,
        config=run.config.to_dict(), ema_state=run.ema.state_dict() if run.ema else None)


# --- 6: train and evaluate ----------------------------------------------------------

def poisson_batch(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of one Poisson-sampled batch: each example included with prob. q."""
    return (torch.rand(n, generator=generator) < sample_rate).nonzero().flatten()


def train_epoch(run: Run, n_steps: int) -> tuple[float, int, float, float]:
    """``n_steps`` DP steps; returns mean train loss, samples seen, seconds, kept fraction.

    The data already lives on the trial's device; batch indices are drawn on the CPU (so
    the batch size is known without a synchronisation) and copied over asynchronously.
    Each logical batch is one :func:`trainables.logical_batch.logical_step` (physical
    chunks, augmentation views), followed by the parameter average's update. Loss and kept
    coordinates are summed on the device and read once, at the end."""
    model, opt, train = run.model, run.optimizer, run.data.train
    model.train()
    loss_sum = torch.zeros((), device=run.device)
    kept = torch.zeros((), device=run.device)
    samples = 0
    started = time.perf_counter()
    for _ in range(n_steps):
        idx = poisson_batch(len(train), run.plan.sample_rate, run.generators["sampler"])
        loss_sum += logical_step(model, opt, train, idx, run.batching)
        if run.ema is not None:
            run.ema.update(model._module)
        samples += len(idx)
        kept += opt.kept_count
    placement.synchronize(run.device)
    seconds = max(time.perf_counter() - started, 1e-9)
    count = opt.trainable_count or 1
    return (float(loss_sum) / max(samples, 1), samples, seconds,
            float(kept) / count / max(n_steps, 1))


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int,
             device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on ``split`` (summed on the device, read once)."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for start in range(0, len(split), batch_size):
        x = split.images[start:start + batch_size].to(device)
        y = split.labels[start:start + batch_size].to(device)
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train()
    return float(loss_sum) / len(split), int(correct) / len(split)


def evaluate_splits(run: Run) -> dict[str, float | None]:
    """``val_loss``/``val_accuracy`` (None without a validation split) and ``test_*``."""
    batch, device = run.config.eval_batch_size, run.device
    test_loss, test_acc = evaluate(run.model, run.data.test, batch, device)
    val_loss = val_acc = None
    if run.data.validation is not None:
        val_loss, val_acc = evaluate(run.model, run.data.validation, batch, device)
    return {"val_loss": val_loss, "val_accuracy": val_acc, "test_loss": test_loss,
            "test_accuracy": test_acc}


def _best(history: list[dict[str, Any]], key: str, value: float | None) -> float | None:
    seen = [h.get(key) for h in history] + [value]
    seen = [v for v in seen if v is not None]
    return max(seen) if seen else None


def release_dp_score(run: Run) -> dict[str, Any]:
    """At the end of training, the DP validation score (Gaussian noise on the count of
    correct validation predictions, charged to the accountant), when the plan has one."""
    noise = run.plan.validation_noise
    if not noise:
        return {}
    split = run.data.validation
    if split is None:
        raise ValueError("privacy.validation_noise: a DP validation score needs a "
                         "validation split (got no validation split)")
    _, accuracy = evaluate(run.model, split, run.config.eval_batch_size, run.device)
    correct = round(accuracy * len(split))
    score = dp_accuracy(correct, run.data.nominal_validation, noise, run.accountant)
    with warnings.catch_warnings():  # PRV at sample rate 1 takes log(0) on a masked branch
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        spent = float(run.accountant.get_epsilon(delta=run.plan.delta))
    return {"val_accuracy_dp": score, "val_noise": noise, "val_releases": 1,
            "epsilon_spent": spent, "budget_used": spent / run.plan.epsilon_target}


def epoch_metrics(run: Run, progress: checkpoint.Progress, *, train_loss: float,
                  scores: dict[str, float | None], samples_per_s: float,
                  kept: float) -> dict[str, Any]:
    """The per-epoch report: progress, scores, privacy spent, sparsity and speed."""
    plan = run.plan
    spent = float(run.accountant.get_epsilon(delta=plan.delta))
    return {
        "epoch": progress.epoch,
        "steps": progress.step,
        "epochs": progress.step * plan.sample_rate,
        "val_accuracy": scores["val_accuracy"],
        "best_val_accuracy": _best(progress.history, "val_accuracy", scores["val_accuracy"]),
        "val_loss": scores["val_loss"],
        "test_accuracy": scores["test_accuracy"],
        "best_test_accuracy": _best(progress.history, "test_accuracy",
                                    scores["test_accuracy"]),
        "test_loss": scores["test_loss"],
        "train_loss": train_loss if math.isfinite(train_loss) else float("nan"),
        "epsilon_spent": spent,
        "budget_used": spent / plan.epsilon_target,
        "epsilon_target": plan.epsilon_target,
        "delta": plan.delta,
        "accountant": plan.accountant,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "steps_planned": plan.steps,
        "epochs_planned": plan.epochs,
        "density": run.pruned.density,
        "drop_rate_effective": 1.0 - kept,
        "num_params": run.pruned.params_before,
        "trainable_params": run.pruned.params_after,
        "samples_per_s": samples_per_s,
        "wall_time_s": progress.elapsed_s,
        "device": str(run.device),
        "reproducible_noise": run.config.reproducible_noise,
        "physical_batch_size": run.config.optim.physical_batch_size,
        "augmentation_multiplicity": run.config.optim.augmentation_multiplicity,
        "ema_decay": run.config.optim.ema_decay,
        "precision": run.config.precision,
        "finished": progress.step >= plan.steps,
    }

