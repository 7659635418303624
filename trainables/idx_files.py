"""IDX files (the MNIST file format): one uint8 array per file, raw or gzip.

:func:`read_idx` reads and checks one file (magic number, header, size); :func:`read_idx_pair`
reads an images file and its labels file, as the ``idx`` dataset of :mod:`trainables.data`
stores them. Every problem is a ``ValueError`` naming the file, or
:class:`~trainables.errors.DataUnavailableError` when the file is missing.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np
import torch

from trainables.errors import DataUnavailableError

IMAGES_MAGIC = (0x0803, 0x0804)  # uint8, 3 dims (N, H, W) or 4 dims
LABELS_MAGIC = (0x0801,)  # uint8, 1 dim (N,)


def read_idx_pair(images_path: str, labels_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64 from two IDX files, checked to
    hold the same number of examples (at least one)."""
    images = read_idx(images_path, "images", IMAGES_MAGIC)
    labels = read_idx(labels_path, "labels", LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{os.path.expanduser(labels_path)}: {len(labels)} labels, but "
                         f"{os.path.expanduser(images_path)} has {len(images)} images")
    if len(images) == 0:
        raise ValueError(f"{os.path.expanduser(images_path)}: holds no examples")
    if images.ndim == 3:
        images = images.unsqueeze(1)
    elif images.shape[-1] == 3:  # (N, H, W, C) colour images
        images = images.permute(0, 3, 1, 2).contiguous()
    return images, labels.long()


def read_idx(path: str, kind: str, magics: tuple[int, ...]) -> torch.Tensor:
    """Read one uint8 IDX file (gzip detected by its magic bytes) as a tensor."""
    path = os.path.expanduser(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, IsADirectoryError):
        raise DataUnavailableError(f"IDX {kind} file not found: {path}") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt gzip data ({err})") from None
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic not in magics:
        wanted = " or ".join(f"0x{m:08x}" for m in magics)
        found = "none (file too short)" if magic is None else f"0x{magic:08x}"
        raise ValueError(f"{path}: not an IDX {kind} file: magic number {found}, "
                         f"expected {wanted}")
    header = 4 + 4 * (magic & 0xFF)
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int.from_bytes(data[i:i + 4], "big") for i in range(4, header, 4))
    if len(data) != header + math.prod(dims):
        raise ValueError(f"{path}: header says shape {dims}, i.e. {header + math.prod(dims)} "
                         f"bytes, but the data has {len(data)} bytes")
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy())
