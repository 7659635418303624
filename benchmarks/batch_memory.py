"""Peak memory and step time of a DP step against the logical batch, at a fixed physical batch.

For each model (``cnn-mnist`` width 4 on 28x28 digits, ``resnet18`` on 32x32x3 images)
and each logical batch (256, 1,024, 4,096 by default), one DP step (mask, clip, accumulate,
noise once, step once: :func:`trainables.logical_batch.logical_step`) is timed with the
logical batch processed in chunks of the physical batch (128 by default), and, where it
fits in ``--unchunked-max`` examples, in one pass as before. Images are synthetic (random
normal): memory and time do not depend on pixel values.

Every configuration runs in its own subprocess, so peak memory is that process's own: on
the CPU its peak resident set size (``ru_maxrss``), on a GPU
``torch.cuda.max_memory_allocated``. ``baseline`` is the process's peak before the first
step (Python, torch, the model and the data); ``step`` is what training adds above it.
Targets: the peak at the largest logical batch is within 1.2x of the peak at the smallest
(chunked), and the time per example chunked is within 1.15x of unchunked where both ran.

Usage: ``python benchmarks/batch_memory.py [--models cnn-mnist,resnet18] [--logical
256,1024,4096] [--physical 128] [--steps 2] [--warmup 1] [--unchunked-max
cnn-mnist=1024,resnet18=0] [--device cpu]
[--json FILE] [--smoke]``. ``--smoke`` is a seconds-long run for the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"cnn-mnist": (1, 28, 28), "resnet18": (3, 32, 32), "cnn-cifar10": (3, 32, 32)}
WIDTHS = {"cnn-mnist": 4.0, "resnet18": 1.0, "cnn-cifar10": 1.0}


def peak_bytes(device: Any) -> int:
    """Peak memory so far: CUDA allocated on a GPU, else this process's peak RSS."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(job: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this process: build, warm up one step, time ``steps`` steps."""
    import torch

    from trainables.augment import augmentation_for
    from trainables.config import ModelConfig
    from trainables.data import Split
    from trainables.logical_batch import Batching, logical_step
    from trainables.models import build_model
    from trainables.optimizer import MaskedDPOptimizer
    from trainables.precision import wrap_model

    torch.manual_seed(0)
    device = torch.device(job["device"])
    shape, logical = SHAPES[job["model"]], job["logical"]
    model = build_model(ModelConfig(name=job["model"], width=job["width"]), num_classes=10,
                        image_shape=shape)
    gsm = wrap_model(model.to(device), "fp32")
    params = [p for p in gsm.parameters() if p.requires_grad]
    opt = MaskedDPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0,
                            max_grad_norm=1.0, expected_batch_size=logical,
                            loss_reduction="mean",
                            generator=torch.Generator(device=device).manual_seed(1))
    train = Split(torch.randn(logical, *shape, device=device),
                  torch.randint(0, 10, (logical,), device=device))
    batching = Batching(physical_batch_size=job["physical"], multiplicity=1,
                        augmentation=augmentation_for("mnist"),
                        generator=torch.Generator(device=device).manual_seed(2),
                        precision="fp32", device=device)
    idx = torch.arange(logical)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = peak_bytes(device)
    for _ in range(job.get("warmup", 1)):  # allocator, first-call costs
        logical_step(gsm, opt, train, idx, batching)
    times = []
    for _ in range(job["steps"]):
        started = time.perf_counter()
        logical_step(gsm, opt, train, idx, batching)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = peak_bytes(device)
    step_s = sorted(times)[len(times) // 2]
    return {**job, "baseline_mb": baseline / 2**20, "peak_mb": peak / 2**20,
            "step_mb": (peak - baseline) / 2**20, "step_s": step_s,
            "us_per_example": step_s / logical * 1e6, "threads": torch.get_num_threads()}


def run_child(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``job`` in a fresh subprocess (its own peak memory); ``error`` if it failed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)],
                             capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**job, "error": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {**job, "error": f"exit {out.returncode}: {tail}"}
    return json.loads(lines[-1])


def jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Chunked runs for every (model, logical batch); unchunked ones up to the cap."""
    out = []
    for model in args.models:
        for logical in args.logical:
            base = {"model": model, "width": WIDTHS[model] if not args.smoke else 1.0,
                    "logical": logical, "steps": args.steps, "warmup": args.warmup,
                    "device": args.device}
            out.append({**base, "physical": args.physical})
            if logical <= args.unchunked_max.get(model, 0):
                out.append({**base, "physical": None})
    return out


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """The two targets, per model, from the rows that ran."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        chunked = sorted((r for r in rows if r["model"] == model and r["physical"]
                          and "error" not in r), key=lambda r: r["logical"])
        if len(chunked) >= 2:
            ratio = chunked[-1]["peak_mb"] / chunked[0]["peak_mb"]
            lines.append(f"{model}: peak at logical {chunked[-1]['logical']} / at "
                         f"{chunked[0]['logical']} = {ratio:.2f}x (target <= 1.2x: "
                         f"{'met' if ratio <= 1.2 else 'MISSED'})")
        for r in chunked:
            whole = [u for u in rows if u["model"] == model and u["physical"] is None
                     and u["logical"] == r["logical"] and "error" not in u]
            if whole:
                ratio = r["us_per_example"] / whole[0]["us_per_example"]
                lines.append(f"{model}: time/example chunked / unchunked at logical "
                             f"{r['logical']} = {ratio:.2f}x (target <= 1.15x: "
                             f"{'met' if ratio <= 1.15 else 'MISSED'})")
    return lines


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows."""
    head = ("| model | logical | physical | peak MB | baseline MB | step MB | step s | "
            "us/example |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    body = []
    for r in rows:
        phys = r["physical"] or "one pass"
        if "error" in r:
            body.append(f"| {r['model']} | {r['logical']} | {phys} | {r['error']} | | | | |")
            continue
        body.append(f"| {r['model']} | {r['logical']} | {phys} | {r['peak_mb']:.0f} | "
                    f"{r['baseline_mb']:.0f} | {r['step_mb']:.0f} | {r['step_s']:.2f} | "
                    f"{r['us_per_example']:.0f} |")
    return "\n".join([head, *body])


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="cnn-mnist,resnet18")
    p.add_argument("--logical", default="256,1024,4096")
    p.add_argument("--physical", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--unchunked-max", default="cnn-mnist=1024,resnet18=0",
                   help="per model, the largest logical batch also run in one pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", help="append one JSON line per configuration to this file")
    p.add_argument("--smoke", action="store_true", help="tiny: cnn-mnist width 1, logical "
                   "64 and 128, physical 32, one step")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.logical, args.physical, args.steps = "cnn-mnist", "64,128", 32, 1
        args.unchunked_max = "cnn-mnist=128"
    args.models = args.models.split(",")
    args.logical = [int(v) for v in args.logical.split(",")]
    args.unchunked_max = {k: int(v) for k, v in
                          (kv.split("=") for kv in args.unchunked_max.split(",") if kv)}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    rows = []
    for job in jobs(args):
        row = run_child(job, args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"\nmachine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, device "
          f"{args.device}")
    print(table(rows))
    print("\n".join(verdicts(rows)))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
