"""How an inner convolution's per-sample weight gradients are fastest, for ``step_cost.py``.

Not a benchmark of its own (no ``__main__``): :func:`conv_path_rows` times, for the inner
convolutions of the models ``step_cost.py`` measures, the two general forms of
:mod:`trainables.grad_sample` (one convolution per sample, ``conv_weight_by_group``; one
batched matrix product of the unfolded input, ``conv_weight_by_unfold``) on random tensors
of the layer's real shapes (at the batch sizes step_cost.py uses), and names the form
``conv2d_grad_sample`` chooses for it (``FEW_POSITIONS``, ``WIDE_PATCH``). Medians of
``repeats`` calls after one untimed call, with a trial's allocator settings
(``trainables.placement.keep_freed_host_memory``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from trainables import grad_sample
from trainables.placement import keep_freed_host_memory

#: name -> (input channels, output channels, kernel, stride, padding, input size, batch)
LAYERS = {
    "cnn-mnist conv2": (16, 32, 4, 2, 0, 13, 256),
    "cnn-mnist width 4 conv2": (64, 128, 4, 2, 0, 13, 256),
    "resnet18-gn stage 1 (32x32)": (64, 64, 3, 1, 1, 32, 32),
    "resnet18-gn stage 2 (16x16)": (128, 128, 3, 1, 1, 16, 32),
    "resnet18-gn stage 3 (8x8)": (256, 256, 3, 1, 1, 8, 32),
    "resnet18-gn stage 4 (4x4)": (512, 512, 3, 1, 1, 4, 32),
}
FORMS = ("group", "unfold")


def median_ms(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``call()`` in ms, after one untimed call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def chosen_form(layer: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor) -> str:
    """The form ``conv2d_grad_sample`` uses for this layer and these tensors."""
    used = []
    originals = {form: getattr(grad_sample, f"conv_weight_by_{form}") for form in
                 ("channel", *FORMS)}
    try:
        for form, method in originals.items():
            setattr(grad_sample, f"conv_weight_by_{form}",
                    lambda *a, _f=form, _m=method: used.append(_f) or _m(*a))
        grad_sample.conv2d_grad_sample(layer, x, grad)
    finally:
        for form, method in originals.items():
            setattr(grad_sample, f"conv_weight_by_{form}", method)
    return used[0]


def conv_path_rows(repeats: int) -> list[tuple[str, ...]]:
    """(layer, batch, ms per form..., chosen, fastest) for every layer of :data:`LAYERS`."""
    keep_freed_host_memory()  # as in a trial
    rows = []
    for name, (cin, cout, k, stride, padding, size, n) in LAYERS.items():
        layer = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
        x = torch.randn(n, cin, size, size)
        with torch.no_grad():
            grad = torch.randn_like(layer(x))
        times = {form: median_ms(partial(getattr(grad_sample, f"conv_weight_by_{form}"),
                                         layer, x, grad), repeats) for form in FORMS}
        rows.append((name, str(n), *(f"{times[f]:.2f}" for f in FORMS),
                     chosen_form(layer, x, grad), min(times, key=times.get)))
    return rows


def print_conv_paths(rows: list[tuple[str, ...]]) -> None:
    """The table of :func:`conv_path_rows`."""
    print("\ninner convolutions: per-sample weight gradients, ms per call (median)")
    header = ("layer", "batch", "grouped conv", "unfolded matmul", "chosen", "fastest")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))
