"""``python -m trainables`` on hostile input: one clear message naming the field or option,
exit 2, before any training; overrides merge field by field into the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainables.__main__ import main, parse_overrides, with_defaults
from trainables.config import TrialConfig

FAST = ["--set", "optim.max_epochs=0.05"]


def refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no epoch was trained
    assert "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize(("override", "expected"), [
    ("k=[unclosed", "--set k: invalid YAML"),
    ("privacy=3", "privacy: must be a mapping of keys to values (got 3)"),
    ("model.weights=/missing/w.pt", "model.weights: file not found (got '/missing/w.pt')"),
    ("dataset.public.size=5000", "dataset.public.size: must be smaller than the 3600"),
    ("optim.batch_size=100000", "optim.batch_size: must be <= n = 3600 training examples "
                                "(got 100000)"),
    ("privacy.epsilon=1e-6", "privacy.epsilon: must be within the range the accountants "
                             "support, [0.1, 20] (got 1e-06)"),
    ("privacy.epsilon=1000", "[0.1, 20] (got 1000)"),
])
def test_bad_override_is_one_clear_problem(override: str, expected: str, capsys) -> None:
    err = refused(["--set", override, *FAST], capsys)
    assert expected in err


def test_alias_in_a_config_file_is_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "trial.yaml"
    path.write_text("optim: &o {batch_size: 64}\nother: *o\n")
    err = refused([str(path)], capsys)
    assert str(path) in err and "anchors and aliases" in err


def test_non_utf8_config_names_the_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "trial.yaml"
    path.write_bytes(b"seed: \xff\n")
    err = refused([str(path)], capsys)
    assert str(path) in err and "UTF-8" in err


@pytest.mark.parametrize("case", ["under /proc", "a file", "a file's child"])
def test_unwritable_checkpoint_dir_before_training(case: str, tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    target = {"under /proc": "/proc/dpstudy/ckpt", "a file": str(a_file),
              "a file's child": str(a_file / "child")}[case]
    err = refused(["--checkpoint-dir", target, *FAST], capsys)
    assert "--checkpoint-dir" in err and target in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_checkpoint_dir_check_leaves_nothing_behind(tmp_path: Path) -> None:
    from trainables.__main__ import writable_dir

    assert writable_dir(str(tmp_path / "new" / "deep")) is None
    assert list(tmp_path.iterdir()) == []


def test_override_merges_into_the_defaults_field_by_field() -> None:
    config = TrialConfig.from_dict(with_defaults(parse_overrides(["privacy.epsilon=8"])))
    assert config.privacy.epsilon == 8
    assert config.privacy.noise_multiplier == TrialConfig().privacy.noise_multiplier == 1.0
    by_epochs = TrialConfig.from_dict(with_defaults(parse_overrides(["privacy.epochs=2"])))
    assert by_epochs.privacy.epochs == 2 and by_epochs.privacy.noise_multiplier is None


def test_a_value_and_keys_under_it_conflict() -> None:
    with pytest.raises(ValueError, match="'privacy' was set to a value"):
        parse_overrides(["privacy=3", "privacy.epsilon=2"])
