"""Device placement, GPU memory share, allocator settings and determinism (CPU-testable)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from trainables import placement, tune_trainable


@pytest.fixture()
def cuda_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU node as a trial without GPUs sees it: CUDA available, nothing reserved."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_auto_follows_what_the_scheduler_assigned(cuda_visible) -> None:
    assert placement.choose_device("auto", assigned_gpus=[]).type == "cpu"
    assert placement.choose_device("auto", assigned_gpus=[0]).type == "cuda"
    assert placement.choose_device("auto", assigned_gpus=None).type == "cuda"  # no Ray
    assert placement.choose_device("cpu", assigned_gpus=[0]).type == "cpu"


def test_cuda_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device: cuda requested but no GPU"):
        placement.choose_device("cuda", assigned_gpus=[])
    assert placement.choose_device("auto", assigned_gpus=None).type == "cpu"


def test_the_ray_edge_runs_a_gpu_0_trial_on_the_cpu(cuda_visible, monkeypatch) -> None:
    """What run_trial hands train() when Ray reserved no GPU: no GPUs, a CPU device."""
    import ray
    from ray import tune

    class Context:
        def get_assigned_resources(self) -> dict[str, float]:
            return {"CPU": 1.0}

    seen: dict[str, Any] = {}
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(placement, "claim_gpu_share",
                        lambda device, share: seen.update(device=device, share=share))
    monkeypatch.setattr(tune_trainable, "train",
                        lambda config, **kw: seen.update(config=config, **kw) or {})
    tune_trainable.run_trial({"device": "auto", "seed": 0})
    assert seen["assigned_gpus"] == [] and seen["device"].type == "cpu"
    assert placement.choose_device(seen["config"]["device"],
                                   assigned_gpus=seen["assigned_gpus"]).type == "cpu"


def test_memory_fraction_is_the_gpu_share() -> None:
    assert placement.memory_fraction(0.25) == 0.25
    assert placement.memory_fraction(1) is None and placement.memory_fraction(2) is None
    assert placement.memory_fraction(0) is None and placement.memory_fraction(None) is None
    assert placement.claim_gpu_share(torch.device("cpu"), 0.25) is None


def test_allocator_gets_expandable_segments_unless_configured(monkeypatch) -> None:
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert placement.prepare_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    assert not placement.prepare_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64"


def test_determinism_is_set_for_every_trial() -> None:
    try:
        placement.set_determinism(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.deterministic
        placement.set_determinism(False)  # a reused process does not keep the last setting
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.allow_tf32
    finally:
        placement.set_determinism(False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_share_caps_memory_and_release_returns_it() -> None:
    device = torch.device("cuda")
    assert placement.claim_gpu_share(device, 0.25) == 0.25
    total = torch.cuda.get_device_properties(device).total_memory
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(int(0.3 * total), dtype=torch.uint8, device=device)
    x = torch.empty(int(0.1 * total), dtype=torch.uint8, device=device)
    del x
    placement.release_memory(device)
    assert torch.cuda.memory_reserved(device) < 0.05 * total
    torch.cuda.set_per_process_memory_fraction(1.0, device)
