"""Checkpoints hold the secret noise and sampler seeds: they are created 0600 in 0700
folders whatever the umask (the temporary file and Tune's copies too); and ``--resume``
from a folder without a checkpoint is refused instead of silently training from scratch."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from trainables import checkpoint
from trainables.__main__ import main

FAST = ["--set", "optim.max_epochs=0.05", "--set", "device=cpu"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():
    previous = os.umask(0)  # the worst case: everything world-writable by default
    try:
        yield
    finally:
        os.umask(previous)


def test_a_checkpoint_is_owner_only_whatever_the_umask(tmp_path: Path, open_umask,
                                                        monkeypatch, capsys) -> None:
    seen_tmp: list[int] = []
    real_save = checkpoint.torch.save

    def spy(payload, out):  # the temporary file, while it is being written
        seen_tmp.append(stat.S_IMODE(os.fstat(out.fileno()).st_mode))
        return real_save(payload, out)

    monkeypatch.setattr(checkpoint.torch, "save", spy)
    target = tmp_path / "new" / "ckpt"
    assert main(["--checkpoint-dir", str(target), *FAST]) == 0
    assert seen_tmp == [0o600]
    assert mode(target) == 0o700
    assert [p.name for p in target.iterdir()] == [checkpoint.FILENAME]
    assert mode(target / checkpoint.FILENAME) == 0o600
    assert "rng" in checkpoint.load(str(target))  # the secret generator states are in it
    capsys.readouterr()


def test_an_existing_checkpoint_dir_is_made_private(tmp_path: Path, open_umask,
                                                    capsys) -> None:
    target = tmp_path / "ckpt"
    target.mkdir(mode=0o777)
    os.chmod(target, 0o777)
    assert main(["--checkpoint-dir", str(target), *FAST]) == 0
    assert mode(target) == 0o700 and mode(target / checkpoint.FILENAME) == 0o600
    capsys.readouterr()


def test_copies_made_like_tunes_are_private(tmp_path: Path, open_umask) -> None:
    """Ray Tune persists a reported checkpoint with pyarrow's copy_files, in the trial's
    process, into the experiment directory (and downloads it back for a resume)."""
    source = tmp_path / "work"
    source.mkdir()
    (source / checkpoint.FILENAME).write_bytes(b"secret")
    fs = pafs.LocalFileSystem()
    with checkpoint.private_files():
        fs.create_dir(str(tmp_path / "exp" / "trial" / "checkpoint_000000"))
        pafs.copy_files(str(source), str(tmp_path / "exp" / "trial" / "checkpoint_000000"),
                        source_filesystem=fs, destination_filesystem=fs)
    copied = tmp_path / "exp" / "trial" / "checkpoint_000000"
    assert mode(copied) == 0o700 and mode(copied / checkpoint.FILENAME) == 0o600
    assert os.umask(0) == 0  # put back afterwards


def test_resume_from_a_folder_without_a_checkpoint_is_refused(tmp_path: Path,
                                                              capsys) -> None:
    empty = tmp_path / "typo"
    empty.mkdir()
    for folder in (empty, tmp_path / "missing"):
        assert main(["--checkpoint-dir", str(folder), "--resume", *FAST]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # nothing trained
        assert captured.err.strip() == (
            f"--checkpoint-dir: no checkpoint to resume from, so --resume would train from "
            f"scratch; check the folder, or leave out --resume to start a new run "
            f"(got {str(folder)!r})")
    assert list(empty.iterdir()) == [] and not (tmp_path / "missing").exists()
