"""Smoke runs of ``benchmarks/batch_memory.py`` and ``benchmarks/recipe.py``: they run,
print their tables, and the recipe benchmark resumes from its results file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_batch_memory_smoke(tmp_path: Path, capsys) -> None:
    bench = load("batch_memory")
    out = tmp_path / "rows.jsonl"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["logical"], r["physical"]) for r in rows] == [(64, 32), (64, None), (128, 32),
                                                             (128, None)]
    assert all(r["peak_mb"] >= r["baseline_mb"] > 0 and r["step_s"] > 0 for r in rows)
    text = capsys.readouterr().out
    assert "| cnn-mnist | 128 | one pass |" in text and "peak at logical 128 / at 64" in text


def test_recipe_smoke_runs_and_resumes(tmp_path: Path, capsys) -> None:
    bench = load("recipe")
    results = tmp_path / "recipe.jsonl"
    assert bench.main(["--smoke", "--results", str(results)]) == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == 2 * (1 + 2)  # two arms, one tuning trial and two seeds each
    assert all(0 <= r["test_accuracy"] <= 1 and r["epsilon_spent"] <= 3.0 for r in records)
    views = {r["arm"]: r["image_passes"] / r["epochs"] for r in records}
    assert views["k2-ema"] == pytest.approx(2 * views["plain"])
    text = capsys.readouterr().out
    assert "| 1 | plain | 1 |" in text and "| 1 | k2-ema | 1 |" in text
    assert bench.main(["--smoke", "--results", str(results)]) == 0  # nothing left to run
    assert len(results.read_text().splitlines()) == len(records)
