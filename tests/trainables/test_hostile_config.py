"""``python -m trainables`` on hostile configs: oversized values, duplicate keys and deep
nesting are one line naming the field or file, exit 2, before any training."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainables.__main__ import main


def refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no epoch was trained
    assert "Traceback" not in captured.err and "RecursionError" not in captured.err
    return captured.err


@pytest.mark.parametrize(("override", "expected"), [
    ("seed=99999999999999999999", "seed: must be <= 4294967295 (got 99999999999999999999)"),
    ("seed=4294967296", "seed: must be <= 4294967295"),
    ("optim.batch_size=10000000000", "optim.batch_size: must be <= 16777216"),
    ("eval_batch_size=10000000000", "eval_batch_size: must be <= 16777216"),
    ("optim.max_epochs=1e12", "optim.max_epochs: must be <= 10000"),
    ("privacy.epochs=1e12", "privacy.epochs: must be <= 10000"),
    ("dataset.public.size=99999999999999", "dataset.public.size: must be <= 1000000000"),
])
def test_oversized_values_name_the_field_and_bound(override: str, expected: str,
                                                   capsys) -> None:
    argv = ["--set", override]
    if override.startswith("privacy.epochs"):
        argv += ["--set", "privacy.noise_multiplier=null"]
    assert expected in refused(argv, capsys)


def test_a_duplicate_key_names_it_and_both_lines(tmp_path: Path, capsys) -> None:
    path = tmp_path / "trial.yaml"
    path.write_text("optim:\n  batch_size: 64\n  learning_rate: 0.5\n  batch_size: 128\n")
    err = refused([str(path)], capsys)
    assert str(path) in err and "duplicate key 'batch_size' (first at line 2, again at line 4)" \
        in err


@pytest.mark.parametrize("text", ["optim: " + "[" * 5000 + "]" * 5000,
                                  "".join("  " * i + f"k{i}:\n" for i in range(5000))])
def test_deep_nesting_is_one_line(text: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "trial.yaml"
    path.write_text(text)
    err = refused([str(path)], capsys)
    assert str(path) in err and "nested deeper than 64 levels" in err


def test_deep_nesting_in_an_override(capsys) -> None:
    err = refused(["--set", "optim=" + "{a: " * 3000 + "1" + "}" * 3000], capsys)
    assert "--set optim: invalid YAML" in err and "nested deeper" in err
