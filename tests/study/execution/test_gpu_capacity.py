"""A study whose trials ask for more GPUs than any node can offer fails fast."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from study.execution import cluster
from study.spec.model import SpecError, StudySpec

SPEC = {
    "name": "gpus", "seed": 0, "dataset": {"name": "mnist-5k"}, "model": {"name": "cnn-mnist"},
    "device": "auto", "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"},
    "search": {"noise_multiplier": 1.0, "learning_rate": 1.0, "clip_norm": 1.0,
               "batch_size": 500, "max_epochs": 1},
    "trials": 1, "resources_per_trial": {"cpu": 1, "gpu": 1}, "scheduler": "none",
}


def spec_with(gpu: float) -> StudySpec:
    return StudySpec.from_dict({**SPEC, "resources_per_trial": {"cpu": 1, "gpu": gpu}})


@pytest.mark.parametrize(("nodes", "types", "gpu", "ok"), [
    ([0.0], {}, 1, False),  # a CPU-only cluster without autoscaling
    ([0.0, 0.0], {"cpu.m5": 0.0}, 0.5, False),  # autoscales CPU nodes only
    ([0.0], {"gpu.g5.xlarge": 1.0}, 1, True),  # an autoscaler node type has one
    ([1.0, 1.0], {}, 2, False),  # two GPUs, but never two on one node
    ([4.0], {}, 2, True),
    ([1.0], {}, 0.25, True),  # fractional share of a GPU that exists
])
def test_check_gpu_capacity(monkeypatch, nodes, types, gpu, ok) -> None:
    monkeypatch.setattr(cluster, "node_capacity", lambda resource: (
        (nodes, types) if resource == "GPU" else ([64.0], {})))  # CPUs are not at issue
    if ok:
        cluster.check_capacity(spec_with(gpu))
        return
    with pytest.raises(SpecError) as info:
        cluster.check_capacity(spec_with(gpu))
    (problem,) = info.value.problems
    assert problem.startswith(f"resources_per_trial.gpu: each trial asks for {gpu:g} GPU")
    assert "wait forever" in problem and str(nodes) in problem


def test_no_gpu_asked_needs_no_cluster(monkeypatch) -> None:
    monkeypatch.setattr(cluster, "node_capacity", lambda resource: (
        pytest.fail("asked the cluster") if resource == "GPU" else ([64.0], {})))
    cluster.check_capacity(spec_with(0))


@pytest.mark.slow
def test_a_gpu_study_on_a_cluster_without_gpus_fails_fast(tmp_path: Path) -> None:
    """A real Ray node with 0 GPUs (what a cluster without GPU nodes looks like to the
    driver of a submitted study): run() refuses at once instead of queueing forever."""
    spec = {**SPEC, "storage": str(tmp_path / "runs"), "results": str(tmp_path / "results")}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    script = textwrap.dedent(f"""
        import sys, time, ray
        from study.execution import runner
        from study.execution import cluster
        from study.spec.model import SpecError, load_spec
        ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False)
        started = time.monotonic()
        try:
            runner.run(load_spec({str(tmp_path / "spec.yaml")!r}), None)
        except SpecError as err:
            print(f"REFUSED after {{time.monotonic() - started:.1f}} s: {{err}}")
        finally:
            ray.shutdown()
    """)
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert "REFUSED after" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    assert float(out.stdout.split("REFUSED after ")[1].split(" s")[0]) < 30
    assert "resources_per_trial.gpu: each trial asks for 1 GPU" in out.stdout
    assert "GPUs per live node: [0.0]" in out.stdout
    assert not (tmp_path / "runs" / "gpus").exists()  # nothing written
    assert time.monotonic() - started < 300
