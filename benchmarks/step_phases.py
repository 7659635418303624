"""Where a DP step's time goes: exclusive wall time per phase, for ``step_cost.py``.

Not a benchmark of its own (no ``__main__``): :func:`phase_times` times ``n`` steps of
:func:`trainables.train.train_epoch` with timers wrapped around the step's pieces (instance
attributes, removed afterwards), so the code timed is the code that trains. Times are
exclusive: a phase's time excludes the phases nested in it (per-sample gradients run
inside backward; mask handling inside clipping). ``other`` is the step's remaining time
(Poisson sampling, indexing the batch, zero_grad, bookkeeping).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from opacus import GradSampleModule

from trainables.grad_sample import FastGradSampleModule
from trainables.optimizer import MaskedDPOptimizer
from trainables.train import Run, train_epoch

PHASES = ("forward", "backward", "per-sample gradients", "clipping", "noise",
          "scale + accounting", "optimizer step", "mask handling", "other")

_MISSING = object()


class Clock:
    """Exclusive time per phase: a nested phase's time is taken off its parent."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[float] = []  # time spent in children of each open phase

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` body as ``name``."""
        self._stack.append(0.0)
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            children = self._stack.pop()
            self.totals[name] += elapsed - children
            if self._stack:
                self._stack[-1] += elapsed

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        """``fn`` timed as ``name``."""
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed


class OpacusTimed(GradSampleModule):
    """Opacus' module with its backward hook (the per-sample gradients) timed."""

    clock: Clock | None = None

    def capture_backprops_hook(self, *args: Any, **kwargs: Any) -> None:
        """Opacus' hook, timed as per-sample gradients while a clock is set."""
        if self.clock is None:
            return super().capture_backprops_hook(*args, **kwargs)
        with self.clock.phase("per-sample gradients"):
            return super().capture_backprops_hook(*args, **kwargs)


class SnapshotStep(MaskedDPOptimizer):
    """The optimizer as it was: clone-and-restore frozen coordinates at every step."""

    def zero_grad_is_no_update(self) -> bool:
        """Never: always snapshot and restore."""
        return False


def use_opacus_module(run: Run) -> Run:
    """Swap the run's per-sample-gradient module for Opacus' own (same parameters)."""
    module = run.model._module
    if isinstance(run.model, FastGradSampleModule):
        run.model.remove_hooks()
    run.model = OpacusTimed(module, batch_first=True, loss_reduction="mean")
    return run


def _wraps(run: Run, clock: Clock) -> list[tuple[Any, str, str]]:
    opt = run.optimizer
    targets = [(run.model, "forward", "forward"),
               (opt, "clip_and_accumulate", "clipping"), (opt, "add_noise", "noise"),
               (opt, "scale_grad", "scale + accounting"),
               (opt.original_optimizer, "step", "optimizer step")]
    targets += [(opt, name, "mask handling") for name in
                ("select", "mask_grad_samples", "_snapshot_frozen", "_restore_frozen",
                 "_zero_frozen_grads")]
    if isinstance(run.model, FastGradSampleModule):
        targets.append((run.model, "_per_sample", "per-sample gradients"))
    return targets


def phase_times(run: Run, n_steps: int) -> dict[str, float]:
    """Milliseconds per step in each of :data:`PHASES`, over ``n_steps`` DP steps."""
    clock = Clock()
    targets = _wraps(run, clock)
    saved = [obj.__dict__.get(attr, _MISSING) for obj, attr, _ in targets]
    for obj, attr, name in targets:
        setattr(obj, attr, clock.wrap(getattr(obj, attr), name))
    opt = run.optimizer
    hook = opt.step_hook
    opt.step_hook = clock.wrap(hook, "scale + accounting") if hook else None
    backward = torch.Tensor.backward
    torch.Tensor.backward = clock.wrap(backward, "backward")  # type: ignore[method-assign]
    OpacusTimed.clock = clock
    try:
        with clock.phase("other"):
            train_epoch(run, n_steps)
    finally:
        torch.Tensor.backward = backward  # type: ignore[method-assign]
        OpacusTimed.clock = None
        opt.step_hook = hook
        for (obj, attr, _), before in zip(targets, saved, strict=True):
            if before is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, before)
    return {name: 1000 * clock.totals.get(name, 0.0) / n_steps for name in PHASES}


def print_phases(columns: dict[str, dict[str, float]]) -> None:
    """One row per phase, one column per configuration (ms per step)."""
    names = list(columns)
    width = max(22, *(len(n) + 2 for n in names))
    print(f"\nwhere a DP step's time goes (ms per step, exclusive)\n{'phase':<22}"
          + "".join(f"{n:>{width}}" for n in names))
    for phase in (*PHASES, "total"):
        cells = [sum(c.values()) if phase == "total" else c[phase] for c in columns.values()]
        print(f"{phase:<22}" + "".join(f"{v:>{width}.2f}" for v in cells))
