"""Specs a hostile user writes: duplicate keys, absurd sizes, oversized seeds and deeply
nested documents are refused by ``dpstudy run`` in one line, exit 2, before Ray starts."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from study.cli import main
from study.spec.model import MAX_STUDY_SEED, StudySpec

GOOD: dict[str, Any] = {
    "name": "limits", "dataset": {"name": "mnist-5k"}, "model": {"name": "cnn-mnist"},
    "privacy": {"epsilon": 3.0, "delta": 1e-5},
    "search": {"clip_norm": 1.0, "noise_multiplier": {"low": 0.5, "high": 2.0},
               "learning_rate": 1.0, "batch_size": 256, "max_epochs": 1},
    "trials": 2,
}


def spec_text(tmp_path: Path, **changes: Any) -> str:
    spec = copy.deepcopy(GOOD)
    spec.update(storage=str(tmp_path / "runs"), results=str(tmp_path / "results"), **changes)
    return yaml.safe_dump(spec, sort_keys=False)


def refused(tmp_path: Path, text: str, capsys: pytest.CaptureFixture) -> str:
    """Run ``text`` as a spec: exit 2, one line per problem, nothing written, no Ray."""
    import sys

    path = tmp_path / "spec.yaml"
    path.write_text(text)
    ray_before = "ray" in sys.modules
    started = time.perf_counter()
    assert main(["run", str(path)]) == 2
    assert time.perf_counter() - started < 10
    err = capsys.readouterr().err
    assert "Traceback" not in err and "RecursionError" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]
    assert ray_before or "ray" not in sys.modules
    return err


def test_a_duplicate_top_level_key_names_the_key_and_both_lines(tmp_path: Path,
                                                                 capsys) -> None:
    text = spec_text(tmp_path).replace("trials: 2\n", "trials: 2\nmax_failures: 1\n"
                                                      "trials: 50\n")
    lines = text.splitlines()
    first, again = lines.index("trials: 2") + 1, lines.index("trials: 50") + 1
    err = refused(tmp_path, text, capsys)
    assert f"duplicate key 'trials' (first at line {first}, again at line {again})" in err


@pytest.mark.parametrize("text", [
    "search:\n  clip_norm: 1.0\n  batch_size: 64\n  clip_norm: 2.0\n",
    "search:\n  noise_multiplier: {low: 0.5, high: 2.0, low: 0.1}\n",
])
def test_a_duplicate_nested_key_is_refused(text: str, tmp_path: Path, capsys) -> None:
    err = refused(tmp_path, "name: dup\n" + text, capsys)
    assert "duplicate key" in err and "first at line" in err


def test_equal_keys_in_different_mappings_are_fine() -> None:
    from trainables.config import load_yaml

    assert load_yaml("x: {a: 1}\ny: {a: 2}\n",
                     "f") == {"x": {"a": 1}, "y": {"a": 2}}


@pytest.mark.parametrize(("shape", "depth"), [("flow", 5000), ("block", 5000),
                                              ("flow", 200_000)])
def test_a_deeply_nested_document_is_one_line(shape: str, depth: int, tmp_path: Path,
                                              capsys) -> None:
    if shape == "flow":
        text = "name: deep\nsearch: " + "[" * depth + "]" * depth + "\n"
    else:
        text = "name: deep\n" + "".join("  " * i + f"k{i}:\n" for i in range(depth))
    err = refused(tmp_path, text, capsys)
    assert "nested deeper than 64 levels" in err and "spec.yaml" in err
    assert len(err.strip().splitlines()) == 2  # the header and the one problem


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("trials", 99999999999999999999999999999, "trials: must be <= 100000"),
    ("max_concurrent", 10**12, "max_concurrent: must be <= 10000"),
    ("max_failures", 10**9, "max_failures: must be <= 1000"),
    ("seed", 2**70, f"seed: must be <= {MAX_STUDY_SEED}"),
    ("seed", 10**500, f"seed: must be <= {MAX_STUDY_SEED}"),
])
def test_absurd_sizes_are_refused_naming_the_bound(field: str, value: int, expected: str,
                                                   tmp_path: Path, capsys) -> None:
    err = refused(tmp_path, spec_text(tmp_path, **{field: value}), capsys)
    assert expected in err


@pytest.mark.parametrize(("param", "value", "expected"), [
    ("batch_size", 10**20, "search.batch_size: must be <= 16777216"),
    ("batch_size", {"low": 64, "high": 10**20}, "search.batch_size.high: must be <= 16777216"),
    ("max_epochs", 1e9, "search.max_epochs: must be <= 10000"),
])
def test_absurd_search_values_are_refused(param: str, value: Any, expected: str,
                                          tmp_path: Path, capsys) -> None:
    search = {**GOOD["search"], param: value}
    err = refused(tmp_path, spec_text(tmp_path, search=search), capsys)
    assert expected in err


def test_a_huge_integer_literal_is_one_line(tmp_path: Path, capsys) -> None:
    err = refused(tmp_path, spec_text(tmp_path).replace("trials: 2", "trials: " + "9" * 5000),
                  capsys)
    assert "integer of 5000 characters is too long" in err


def test_the_largest_seed_leaves_room_for_confirmation_seeds() -> None:
    import numpy as np

    spec = StudySpec.from_dict({**GOOD, "seed": MAX_STUDY_SEED, "confirm": {"seeds": 100}})
    from study.analysis.confirm import confirm_seeds

    for seed in confirm_seeds(spec.seed, spec.confirm.seeds):
        np.random.seed(seed)  # numpy's range holds every confirmation seed


def test_more_cpus_than_this_machine_has_is_refused_before_anything_is_written(
        tmp_path: Path, capsys) -> None:
    import os

    cpus = os.cpu_count()
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text(tmp_path, resources_per_trial={"cpu": 64 * cpus}))
    started = time.perf_counter()
    assert main(["run", str(path)]) == 2
    assert time.perf_counter() - started < 60
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (f"resources_per_trial.cpu: each trial asks for {64 * cpus} CPUs but this machine "
            f"has {cpus}; its trials would wait forever") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


@pytest.mark.parametrize(("nodes", "types", "cpu", "ok"), [
    ([2.0], {}, 64, False),
    ([2.0, 2.0], {}, 3, False),  # four CPUs, but never three on one node
    ([2.0], {"cpu.m5.16xlarge": 64.0}, 64, True),  # the autoscaler can start one
    ([2.0], {}, 0.5, True),
])
def test_check_cpu_capacity_on_a_cluster(monkeypatch, nodes, types, cpu, ok) -> None:
    from study.execution import cluster
    from study.spec.model import SpecError

    monkeypatch.setattr(cluster, "node_capacity",
                        lambda resource: (nodes, types) if resource == "CPU" else ([0.0], {}))
    spec = StudySpec.from_dict({**GOOD, "resources_per_trial": {"cpu": cpu}})
    if ok:
        cluster.check_capacity(spec)
        return
    with pytest.raises(SpecError) as info:
        cluster.check_capacity(spec)
    (problem,) = info.value.problems
    assert problem.startswith(f"resources_per_trial.cpu: each trial asks for {cpu:g} CPU")
    assert "wait forever" in problem and str(nodes) in problem
