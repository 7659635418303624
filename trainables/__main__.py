"""Run one trial without Ray: ``python -m trainables [CONFIG.yaml] [--set key=value ...]``.

Prints one JSON line per epoch. ``--checkpoint-dir`` keeps a checkpoint after every
epoch, and ``--resume`` continues from it (same final model and epsilon as an
uninterrupted run). Exit code 2 on an invalid configuration.

Large batches and the DP recipe: ``--set optim.batch_size=4096 --set
optim.physical_batch_size=256`` (the logical batch in chunks of 256 images), ``--set
optim.augmentation_multiplicity=8`` (8 augmented views per example), ``--set
optim.ema_decay=0.999`` (evaluate the parameter average), ``--set precision=bf16`` (CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["optim.batch_size=128", "pruning.rate=0.5"]`` -> nested dict (values as YAML)."""
    from trainables.config import ConfigError, load_yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or "" in key.split("."):
            raise ValueError(f"--set: expected KEY=VALUE such as pruning.rate=0.5 (got {pair!r})")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part!r} was set to a value above, so it "
                                 f"cannot also hold keys (got {pair!r})")
        try:
            node[leaf] = load_yaml(value, f"--set {key}")
        except ConfigError as err:
            raise ValueError(f"{err.problems[0]} (got {pair!r})") from None
    return out


def with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` merged field by field into the default :class:`TrialConfig`, so that
    ``--set privacy.epsilon=8`` keeps the default noise multiplier. Of the alternatives
    ``privacy.noise_multiplier`` / ``privacy.epochs``, the one ``data`` gives wins."""
    from trainables.config import TrialConfig

    defaults = TrialConfig().to_dict()
    privacy = data.get("privacy")
    if isinstance(privacy, dict) and privacy.get("epochs") is not None and \
            "noise_multiplier" not in privacy:
        defaults["privacy"]["noise_multiplier"] = None
    return merge(defaults, data)


def preflight(config: Any) -> list[str]:
    """Problems found before training: local weights present, the data large enough for
    the public hold-out and the batch size, a GPU for bf16, the checkpoint directory
    writable."""
    import os

    from trainables.data import dataset_size
    from trainables.errors import DataUnavailableError

    problems = []
    weights = config.model.weights
    if weights and not os.path.isfile(os.path.expanduser(weights)):
        problems.append(f"model.weights: file not found (got {weights!r})")
    try:
        n = dataset_size(config.dataset, seed=config.seed)
        if config.optim.batch_size > n:
            problems.append(f"optim.batch_size: must be <= n = {n} training examples "
                            f"(got {config.optim.batch_size!r})")
    except (DataUnavailableError, ValueError) as err:
        problems.append(str(err) if str(err).startswith("dataset") else f"dataset: {err}")
    if config.precision == "bf16":
        import torch

        if not torch.cuda.is_available():
            problems.append("precision: bf16 needs a CUDA device and none is available "
                            "(got 'bf16')")
    if config.checkpoint_dir:
        problem = writable_dir(config.checkpoint_dir)
        if problem:
            problems.append(f"--checkpoint-dir: {problem} (got {config.checkpoint_dir!r})")
    return problems


def writable_dir(path: str) -> str | None:
    """Why ``path`` cannot hold checkpoints, or None. Directories created to find out are
    removed again."""
    import os
    import tempfile

    path = os.path.abspath(os.path.expanduser(path))
    created, current = [], path
    while not os.path.exists(current):
        created.append(current)
        current = os.path.dirname(current)
    if not os.path.isdir(current):
        return f"{current!r} is a file, not a directory"
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        return f"cannot write there ({err.strerror or err})"
    finally:
        for directory in created:  # deepest first
            try:
                os.rmdir(directory)
            except OSError:
                pass
    return None


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``extra`` wins."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m trainables", description=__doc__)
    parser.add_argument("config", nargs="?", help="trial config YAML (TrialConfig fields)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set privacy.epsilon=8 (repeatable)")
    parser.add_argument("--checkpoint-dir", help="keep per-epoch checkpoints here")
    parser.add_argument("--resume", action="store_true", help="resume from --checkpoint-dir")
    args = parser.parse_args(argv)

    from trainables.config import ConfigError, TrialConfig, read_yaml_file

    try:
        data: dict[str, Any] = {}
        if args.config:
            data = read_yaml_file(args.config, "trial config") or {}
            if not isinstance(data, dict):
                raise ConfigError([f"{args.config}: the top level must be a mapping of keys "
                                   f"to values (got {type(data).__name__})"])
        data = with_defaults(merge(data, parse_overrides(args.set)))
        if args.checkpoint_dir:
            data["checkpoint_dir"] = args.checkpoint_dir
        config = TrialConfig.from_dict(data)
    except (ConfigError, ValueError, OSError) as err:
        print(f"invalid trial configuration:\n{err}", file=sys.stderr)
        return 2
    if args.resume and not args.checkpoint_dir:
        print("--resume needs --checkpoint-dir", file=sys.stderr)
        return 2
    from trainables import checkpoint

    if args.resume and not checkpoint.exists(args.checkpoint_dir):
        print(f"--checkpoint-dir: no checkpoint to resume from, so --resume would train from "
              f"scratch; check the folder, or leave out --resume to start a new run "
              f"(got {args.checkpoint_dir!r})", file=sys.stderr)
        return 2
    problems = preflight(config)
    if problems:
        print("invalid trial configuration:\n" + "\n".join(f"  - {p}" for p in problems),
              file=sys.stderr)
        return 2

    from trainables.accounting import BudgetError
    from trainables.errors import DataUnavailableError
    from trainables.train import train

    resume = args.checkpoint_dir if args.resume else None
    if resume:
        try:
            state = checkpoint.load(resume)
            checkpoint.check_compatible(state, config.to_dict(), resume)
        except checkpoint.CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if checkpoint.is_finished(state):
            step = state["progress"]["step"]
            print(f"checkpoint {resume}: the trial is already finished ({step} of "
                  f"{state['plan']['steps']} steps); nothing to resume", file=sys.stderr)
            return 0
    try:
        train(config, report=lambda m, _d: print(json.dumps(m), flush=True), resume_from=resume)
    except (BudgetError, DataUnavailableError, checkpoint.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
