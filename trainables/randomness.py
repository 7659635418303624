"""The random generators of one trial: which are secret, which are seeded, how they resume.

A trial draws from five named generators:

========== ========== ===================================== ==============================
name       device     what it draws                         seeded from
========== ========== ===================================== ==============================
noise      trial's    the Gaussian noise of every DP step   secret seed
sampler    CPU        Poisson batch membership              secret seed
pruning    CPU        random pruning scores                 spec ``seed``
selector   trial's    random dropping masks, public batches spec ``seed``
augment    trial's    augmentation views (crops, flips)     spec ``seed``
========== ========== ===================================== ==============================

The DP guarantee needs the noise *and* the batch membership to be unknown to whoever sees
the released model: with the noise stream one subtracts the noise, with the sampler stream
one learns which steps saw an example, which voids the amplification by subsampling the
accountant relies on. Both are therefore seeded from a *secret seed* drawn from the
operating system (:func:`secrets.randbits`) once per trial. It is kept only in the trial's
private checkpoint (so a resumed trial continues exactly) and never reported. Pruning,
dropping and augmentation draw no randomness from private data, and the privacy analysis
does not depend on their randomness, so they stay reproducible from the spec's seed.

``reproducible_noise: true`` (a research switch) seeds noise and sampler from the spec
seed instead; the guarantee then holds only while that seed stays secret, and every
output says so.

Checkpoints store each generator as ``{"device", "seed", "state"}``. A state restores
exactly onto a generator of the same device type. A CPU state (Mersenne Twister, 5,056
bytes) and a CUDA state (Philox seed and offset, 16 bytes) cannot be converted into each
other, so across device types the stream is re-derived from the generator's seed, its name
and the step counter (:func:`derived_seed`): a fresh stream, still secret, never one
already used, but not bit-identical with an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import secrets
import warnings
from typing import Any

import torch

#: Generators seeded from the secret seed unless ``reproducible_noise`` is set.
SECRET = ("noise", "sampler")
#: Generators seeded from the spec seed (they read no private data).
SEEDED = ("pruning", "selector", "augment")

REPRODUCIBLE_NOISE_WARNING = (
    "reproducible_noise is on: the DP noise and batch sampling are seeded from the spec "
    "seed, which is written to the results; each trial's privacy guarantee assumes that "
    "seed stays secret, and no study-level bound holds (every trial draws the same noise)")


def draw_secret_seed() -> int:
    """A fresh 63-bit seed from the operating system's CSPRNG."""
    return secrets.randbits(63)


def derived_seed(seed: int, name: str, step: int = 0) -> int:
    """A 63-bit seed for generator ``name`` at ``step``, derived from ``seed`` by hashing."""
    digest = hashlib.blake2b(f"{seed}:{name}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def make_generators(spec_seed: int, device: torch.device, *, reproducible_noise: bool,
                    secret_seed: int | None = None) -> tuple[dict[str, torch.Generator],
                                                           dict[str, int]]:
    """The five generators of a trial and their seeds (name -> seed).

    ``secret_seed`` defaults to :func:`draw_secret_seed`; with ``reproducible_noise`` the
    spec seed takes its place (and :data:`REPRODUCIBLE_NOISE_WARNING` is issued)."""
    if reproducible_noise:
        warnings.warn(REPRODUCIBLE_NOISE_WARNING, stacklevel=2)
        secret_seed = spec_seed
    elif secret_seed is None:
        secret_seed = draw_secret_seed()
    devices = {"noise": device, "sampler": torch.device("cpu"),
               "pruning": torch.device("cpu"), "selector": device, "augment": device}
    seeds = {name: derived_seed(secret_seed if name in SECRET else spec_seed, name)
             for name in (*SECRET, *SEEDED)}
    generators = {name: torch.Generator(device=devices[name]).manual_seed(seed)
                  for name, seed in seeds.items()}
    return generators, seeds


def generator_records(generators: dict[str, torch.Generator],
                      seeds: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Checkpointable ``{name: {"device", "seed", "state"}}`` (states on the CPU)."""
    return {name: {"device": g.device.type, "seed": seeds[name], "state": g.get_state()}
            for name, g in generators.items()}


def restore_generator(generator: torch.Generator, record: dict[str, Any], *, name: str,
                      step: int) -> bool:
    """Restore ``record`` into ``generator``; returns whether the stream continues exactly.

    Same device type: the exact state. Otherwise the stream is re-derived from the
    record's seed, ``name`` and ``step`` (see the module docstring)."""
    if record["device"] == generator.device.type:
        generator.set_state(record["state"])
        return True
    generator.manual_seed(derived_seed(record["seed"], name, step))
    return False


def restore_generators(generators: dict[str, torch.Generator],
                       records: dict[str, dict[str, Any]], *, step: int) -> list[str]:
    """Restore every named generator; returns the names whose stream was re-derived."""
    missing = sorted(set(generators) - set(records))
    if missing:
        raise ValueError(f"checkpoint: no state for generator(s) {missing}")
    rederived = [name for name, g in generators.items()
                 if not restore_generator(g, records[name], name=name, step=step)]
    if rederived:
        warnings.warn(f"resumed on another device type: generator(s) {rederived} continue "
                      f"from a stream re-derived at step {step}, so this run is not "
                      f"bit-identical with an uninterrupted one", stacklevel=2)
    return rederived
