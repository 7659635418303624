"""Where a trial runs: the device, its share of a GPU, the allocator and the cleanup.

Ray-free: :mod:`trainables.tune_trainable` asks Ray what it assigned (``ray.get_gpu_ids()``
and the trial's GPU share) and passes the answers here.

* ``device: auto`` follows the assignment: CUDA only if Ray gave the trial a GPU. A trial
  that reserved no GPU runs on the CPU even on a GPU node (Ray leaves
  ``CUDA_VISIBLE_DEVICES`` unset for it, so "is CUDA available?" would say yes and pile it
  onto GPU 0 unreserved). Outside Ray, ``auto`` means "CUDA if available".
* Several trials on one GPU (fractional ``gpu``): each process is capped to its share of
  the GPU's memory, the caching allocator uses expandable segments (Poisson batch sizes
  change every step, which fragments fixed segments), and a finished trial returns its
  cached memory (``reuse_actors`` keeps the process, and the next trial, for it).
* ``deterministic``: deterministic algorithms and no TF32, set for every trial (the
  settings are process-wide and a reused process would otherwise keep the last trial's).
* On the CPU, host memory freed by one step is kept for the next
  (:func:`keep_freed_host_memory`): per-sample gradients and oneDNN's buffers are
  megabytes each, allocated and freed every step in sizes that follow the Poisson batch,
  and glibc would otherwise hand them back to the OS and page-fault them in again (about
  5 ms of a 35 ms cnn-mnist step on a 2-core VM).
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Sequence

import torch

ALLOC_CONF = "expandable_segments:True"
_ALLOC_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for deterministic results
#: glibc ``mallopt`` parameters and the values :func:`keep_freed_host_memory` sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks below it come from the heap
TRIM_THRESHOLD = 1 << 30  # free heap kept before any is returned to the OS


def choose_device(requested: str, *, assigned_gpus: Sequence[object] | None = None
                  ) -> torch.device:
    """The torch device of a trial.

    ``assigned_gpus`` is what the scheduler gave the trial (``ray.get_gpu_ids()``), or
    ``None`` outside a scheduler. ``auto`` follows it; ``cuda`` needs a visible GPU."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda requested but no GPU is available (got 'cuda')")
    if requested == "auto":
        if assigned_gpus is not None:
            return torch.device("cuda" if assigned_gpus else "cpu")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def memory_fraction(gpu_share: float | None) -> float | None:
    """The memory cap for a trial holding ``gpu_share`` of one GPU (None: no cap)."""
    if gpu_share is None or gpu_share <= 0 or gpu_share >= 1:
        return None
    return float(gpu_share)


def prepare_allocator() -> bool:
    """Ask for expandable segments unless the user configured the allocator; returns
    whether it was set. Effective only before CUDA is first used in this process."""
    if any(os.environ.get(name) for name in _ALLOC_ENV):
        return False
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return False
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF
    return True


def keep_freed_host_memory() -> bool:
    """Have glibc's allocator serve blocks up to 32 MiB from its heap and keep up to
    1 GiB of freed heap, instead of mapping each large block afresh and returning it
    on free (every page then faults in again at the next step). Process-wide; returns
    whether it took effect (False off glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def claim_gpu_share(device: torch.device, gpu_share: float | None) -> float | None:
    """Cap this process' memory on ``device`` to its share; returns the cap applied."""
    fraction = memory_fraction(gpu_share)
    if device.type != "cuda" or fraction is None:
        return None
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def release_memory(device: torch.device | None = None) -> None:
    """Return cached GPU memory to the driver once a trial's tensors are gone."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def set_determinism(deterministic: bool) -> None:
    """Deterministic algorithms, no TF32 and no cuDNN autotuning, or torch's defaults.

    TF32 (tensor cores on Ampere and newer) is left off for matmuls, torch's default, and
    switched off for cuDNN convolutions only in deterministic mode."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = False


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (before reading a clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
