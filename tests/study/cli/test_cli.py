"""The CLI on bad input: clear message, exit code 2, nothing written. Plus query/status."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from study.cli import main
from study.storage.schema import TRIALS_SCHEMA
from study.storage.store import ResultsStore

GOOD: dict[str, Any] = {
    "name": "bad", "dataset": {"name": "mnist-5k"}, "model": {"name": "cnn-mnist"},
    "privacy": {"epsilon": 3.0, "delta": 1e-5},
    "search": {"clip_norm": 1.0, "noise_multiplier": {"low": 1.0, "high": 2.0},
               "learning_rate": 1.0, "batch_size": 256, "max_epochs": 1},
    "trials": 2,
}


def spec_with(tmp_path: Path, change) -> Path:
    spec = copy.deepcopy(GOOD)
    spec["storage"] = str(tmp_path / "runs")
    spec["results"] = str(tmp_path / "results")
    change(spec)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


CASES = {
    "wrong type": (lambda s: s.update(trials="eight"), ["trials", "integer", "'eight'"]),
    "rate out of range": (lambda s: s["search"].update(prune_rate={"low": 0.1, "high": 1.5}),
                          ["search.prune_rate.high", "< 1", "1.5"]),
    "negative drop rate": (lambda s: s["search"].update(drop_rate=-0.1),
                           ["search.drop_rate", ">= 0", "-0.1"]),
    "delta >= 1/n": (lambda s: s["privacy"].update(delta=1e-3),
                     ["privacy.delta", "1/n", "3600", "0.001"]),
    "unknown key": (lambda s: s.update(serach=s.pop("search")),
                    ["serach", "unknown key", "did you mean 'search'"]),
    "missing dataset files": (lambda s: s.update(dataset={
        "name": "idx", "train_images": "/nonexistent/train-images.gz",
        "train_labels": "/nonexistent/train-labels.gz", "test": {"name": "mnist-5k"}}),
        ["dataset", "/nonexistent/train-labels.gz"]),
    "negative epsilon": (lambda s: s["privacy"].update(epsilon=-1.0),
                         ["privacy.epsilon", "[0.1, 20]", "-1.0"]),
    "gpu without a gpu": (lambda s: s.update(resources_per_trial={"cpu": 1, "gpu": 1}),
                          ["resources_per_trial.gpu", "no GPU"]),
    "noise too small for one epoch": (
        lambda s: s["search"].update(noise_multiplier={"low": 0.1, "high": 0.2}),
        ["search.noise_multiplier", "must reach into", "0.2"]),
    "range only above the budget-spending interval": (
        lambda s: s["search"].update(noise_multiplier={"low": 20.0, "high": 30.0}),
        ["search.noise_multiplier", "must reach into", "30"]),
    "selecting on test without saying so": (
        lambda s: s.update(objective={"metrics": ["test_accuracy"]}),
        ["objective.metrics", "allow_test_selection", "test_accuracy"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_spec_exit_2_clear_message_nothing_written(case: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    change, expected = CASES[case]
    path = spec_with(tmp_path, change)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, f"{text!r} not in:\n{err}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_all_problems_reported_together(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def many(s: dict) -> None:
        s["privacy"]["epsilon"] = 0
        s["trials"] = 0
        s["search"]["drop_rate"] = 1.0

    assert main(["run", str(spec_with(tmp_path, many))]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err
    assert all(k in err for k in ("privacy.epsilon", "trials", "search.drop_rate"))


def test_missing_spec_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def fixture_results(tmp_path: Path) -> Path:
    store = ResultsStore(str(tmp_path / "results"), "fix")
    # t0 is best on test, t1 on validation: selection must follow validation
    for i, (prune, val, acc, density, status) in enumerate([
            (0.0, 0.89, 0.90, 1.0, "completed"), (0.5, 0.91, 0.88, 0.5, "completed"),
            (0.9, 0.70, 0.70, 0.1, "completed"), (0.6, 0.80, 0.80, 0.6, "completed"),
            (0.95, 0.99, 0.99, 0.05, "stopped")]):
        store.add_trial({"trial_id": f"t{i}", "status": status, "prune_rate": prune,
                         "val_accuracy": val, "test_accuracy": acc, "density": density,
                         "epsilon_target": 3.0, "epsilon_spent": 2.9}, [])
    store.flush()
    return tmp_path / "results"


def test_query_filters_sorts_and_pareto(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = str(fixture_results(tmp_path))
    assert main(["query", results, "--where", "prune_rate>0.4", "--where", "epsilon==3",
                 "--sort=-test_accuracy", "--columns", "trial_id,test_accuracy",
                 "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["trial_id,test_accuracy", "t4,0.99", "t1,0.88", "t3,0.8", "t2,0.7"]
    assert main(["query", results, "--pareto", "accuracy,density", "--columns", "trial_id",
                 "--format", "csv"]) == 0
    front = capsys.readouterr().out.strip().splitlines()[1:]
    assert sorted(front) == ["t1", "t2"]  # on validation: t0, t3 dominated by t1; t4 stopped
    assert main(["query", results, "--pareto", "test_accuracy,density", "--columns",
                 "trial_id", "--format", "csv"]) == 0
    assert sorted(capsys.readouterr().out.strip().splitlines()[1:]) == ["t0", "t1", "t2"]


def test_query_default_and_all_columns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = ResultsStore(str(tmp_path / "results"), "fix")
    store.add_trial({"trial_id": "t0", "status": "completed", "stage": "search",
                     "prune_rate": 0.5, "drop_rate": 0.2, "params": json.dumps(
                         {"prune_rate": 0.5, "drop_rate": 0.2}),
                     "selection_metric": "val_accuracy", "val_accuracy": 0.9,
                     "epsilon_target": 3.0, "epsilon_spent": 2.9}, [])
    store.flush()
    results = str(tmp_path / "results")
    assert main(["query", results, "--format", "csv"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split(",")
    assert header == ["trial_id", "stage", "status", "prune_rate", "drop_rate", "val_accuracy",
                      "test_accuracy", "epsilon_spent", "budget_used"]
    assert main(["query", results, "--sort", "wall_time_s", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(",budget_used,wall_time_s")
    assert main(["query", results, "--columns", "all", "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.splitlines()[0].split(",")) == len(TRIALS_SCHEMA)


def test_query_bad_filter_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = str(fixture_results(tmp_path))
    assert main(["query", results, "--where", "prune_rat>0.5"]) == 2
    assert "prune_rat" in capsys.readouterr().err


def test_status_lists_studies(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = fixture_results(tmp_path)
    study_dir = tmp_path / "runs" / "fix"
    study_dir.mkdir(parents=True)
    spec = copy.deepcopy(GOOD) | {"name": "fix", "trials": 6, "results": str(results)}
    (study_dir / "dpstudy-spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["status", "--storage", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "fix" in out and "5/6 finished" in out and "1 stopped early" in out
    assert "best val_accuracy on validation 0.9100 (test_accuracy 0.8800)" in out
    test_spec = spec | {"objective": {"metrics": ["test_accuracy"],
                                      "allow_test_selection": True}}
    (study_dir / "dpstudy-spec.yaml").write_text(yaml.safe_dump(test_spec))
    assert main(["status", "--storage", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "best test_accuracy on test (SELECTED ON TEST: optimistic) 0.9000" in out
