"""Every benchmark script runs: a smoke run of each (a few steps), so one that rots fails CI.

The scripts run as ``python benchmarks/...`` runs them, as ``__main__`` with their folder
first on ``sys.path``, but in this process (``tests/inprocess.py``): a subprocess would
import torch and Ray again and start a Ray of its own. The assertions check the tables
they print, not the figures in them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from inprocess import benchmark

ROOT = Path(__file__).resolve().parents[1]

#: script (relative to benchmarks/) -> the test that smoke-runs it
SMOKED = {
    "step_cost.py": "tests/test_benchmarks.py::test_step_cost_smoke",
    "study_overhead.py": "tests/test_benchmarks.py::test_study_overhead_smoke",
    "audit.py": "tests/test_benchmarks.py::test_audit_smoke",
    "kill_resume.py":
        "tests/study/execution/test_concurrency.py::test_kill_while_trials_finish_reruns_nothing",
    "tradeoff/run.py": "tests/test_benchmarks.py::test_tradeoff_report_smoke",
    "batch_memory.py": "tests/trainables/test_recipe_benchmarks.py::test_batch_memory_smoke",
    "recipe.py": "tests/trainables/test_recipe_benchmarks.py::test_recipe_smoke_runs_and_resumes",
}


def run_script(script: str, *args: str) -> str:
    """Run ``benchmarks/<script> args`` from the repository root; its stdout (exit 0)."""
    done = benchmark(script, *args)
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def test_every_benchmark_script_has_a_smoke_run() -> None:
    """A script with a ``__main__`` entry point in benchmarks/ is listed in SMOKED, and the
    test listed there exists."""
    scripts = {str(p.relative_to(ROOT / "benchmarks")) for p in (ROOT / "benchmarks").rglob(
        "*.py") if '__name__ == "__main__"' in p.read_text(encoding="utf-8")}
    assert scripts == set(SMOKED), f"scripts without a smoke run: {scripts - set(SMOKED)}"
    for test in SMOKED.values():
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(encoding="utf-8"), test


@pytest.mark.slow
def test_step_cost_smoke() -> None:
    """All configurations, the phase breakdown, --models (width-4 CNN, ResNet-18-GN at
    batch 1) and --conv-paths, one step each."""
    out = run_script("step_cost.py", "--steps", "1", "--repeats", "1", "--warmup", "0",
                     "--phase-steps", "1", "--models", "--resnet-batch", "1", "--conv-paths")
    for line in ("non-private SGD", "DP-SGD before", "DP structured prune 0.75",
                 "(c) DP-SGD >= 0.85x", "where a DP step's time goes", "per-sample gradients",
                 "mask handling", "cnn-mnist width 4", "resnet18-gn", "inner convolutions",
                 "resnet18-gn stage 4 (4x4)"):
        assert line in out, f"{line!r} missing from:\n{out}"


@pytest.mark.slow
def test_study_overhead_smoke() -> None:
    out = run_script("study_overhead.py", "--trials", "2", "--work-s", "0.05")
    assert "overhead/trial" in out and "PASS/FAIL" in out, out


@pytest.mark.slow
def test_audit_smoke() -> None:
    pytest.importorskip("jax_privacy", reason="the audit extra: pip install 'dpstudy[audit]'")
    """One case, two draws of its OS-seeded noise and their median."""
    out = run_script("audit.py", "--only", "correct", "--claimed", "8", "--canaries", "50",
                     "--repeats", "2")
    rows = [r for r in out.splitlines() if r.startswith("| correct")]
    assert len(rows) == 3 and rows[-1].startswith("| correct: median of 2 |"), out


def test_tradeoff_report_smoke(tmp_path: Path) -> None:
    """The trade-off benchmark's page from its committed results (report and plots), to a
    scratch folder; the full run is hours, its studies are the service's own."""
    out_page = tmp_path / "RESULTS.md"
    out = run_script("tradeoff/run.py", "--report-only", "--results",
                     str(ROOT / "benchmarks" / "tradeoff" / "results"), "--out", str(out_page))
    assert "[bench] wrote" in out and out_page.read_text().startswith("# Trade-off")
    assert list((tmp_path / "results").glob("*.png"))


def test_tradeoff_studies_are_valid_specs() -> None:
    """Every study the trade-off design runs is a valid dpstudy spec (full and smoke)."""
    path = ROOT / "benchmarks" / "tradeoff" / "studies.py"
    spec = importlib.util.spec_from_file_location("tradeoff_studies", path)
    studies = importlib.util.module_from_spec(spec)
    sys.modules["tradeoff_studies"] = studies  # dataclasses look their module up
    try:
        spec.loader.exec_module(studies)
    finally:
        del sys.modules["tradeoff_studies"]
    from study.spec.model import StudySpec

    for scale in studies.SCALES.values():
        for study in [*studies.stage1([1.0, 4.0]), *studies.stage2([1.0, 4.0], "both")]:
            data = studies.spec(study, scale, storage="/tmp/s", results="/tmp/r",
                                cpus_per_trial=1, concurrent=2, fixed=None)
            assert StudySpec.from_dict(data).name == study.name
