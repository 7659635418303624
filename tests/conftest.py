"""Test-wide settings: Ray stays on loopback and quiet; no GPU is assumed."""

from __future__ import annotations

import os

# Read by Ray at import time: bind the embedded Ray to 127.0.0.1, keep output short.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
