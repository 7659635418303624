"""Run one trial without Ray: ``python -m trainables [CONFIG.yaml] [--set key=value ...]``.

Prints one JSON line per epoch. ``--checkpoint-dir`` keeps a checkpoint after every
epoch, and ``--resume`` continues from it (same final model and epsilon as an
uninterrupted run). Exit code 2 on an invalid configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["optim.batch_size=128", "pruning.rate=0.5"]`` -> nested dict (values as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set: expected KEY=VALUE such as pruning.rate=0.5 (got {pair!r})")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


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

    import yaml

    from trainables.config import ConfigError, TrialConfig

    try:
        data: dict[str, Any] = {}
        if args.config:
            with open(args.config, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        data = merge(data, parse_overrides(args.set))
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
    from trainables.accounting import BudgetError
    from trainables.data import DataUnavailableError
    from trainables.train import train

    resume = args.checkpoint_dir if args.resume and checkpoint.exists(args.checkpoint_dir) else None
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
