"""Commands on bad or relative targets: ``status --storage`` on a missing path or a file is
exit 2 naming it; ``resume`` takes relative paths (Tune takes only absolute ones) and
refuses a missing one before Ray starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from study import cli
from study.cli import main
from study.cli.targets import experiment_target

ROOT = Path(__file__).resolve().parents[3]


def refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    return captured.err.strip()


def test_status_of_a_missing_storage_root(tmp_path: Path, capsys) -> None:
    missing = str(tmp_path / "nowhere")
    assert refused(["status", "--storage", missing], capsys) == (
        f"error: --storage: no such directory (got {missing!r})")


def test_status_of_a_regular_file(tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert refused(["status", "--storage", str(a_file)], capsys) == (
        f"error: --storage: is not a directory (got {str(a_file)!r})")


def test_status_of_an_empty_root_and_of_the_default_one(tmp_path: Path, capsys,
                                                        monkeypatch) -> None:
    assert main(["status", "--storage", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"no studies under {tmp_path}"
    monkeypatch.setenv("HOME", str(tmp_path / "new-user"))  # no study has run yet
    assert main(["status"]) == 0
    assert capsys.readouterr().out.strip() == "no studies under ~/dpstudy-runs"


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    directory = tmp_path / "runs" / "study1"
    directory.mkdir(parents=True)
    (directory / "dpstudy-spec.yaml").write_text("name: study1\n")
    return directory


@pytest.mark.parametrize(("argv", "cwd"), [
    (["../runs/study1"], "elsewhere"), (["runs/study1"], "."),
    (["study1", "--storage", "../runs"], "elsewhere"), (["study1", "--storage", "runs"], "."),
])
def test_relative_resume_targets_are_made_absolute(argv: list[str], cwd: str, experiment: Path,
                                                   tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / cwd)
    args = cli.build_parser().parse_args(["resume", *argv])
    assert experiment_target(args.study, args.storage) == str(experiment)


@pytest.mark.parametrize("argv", [["../runs/nope"], ["nope", "--storage", "../runs"]])
def test_a_missing_resume_target_is_refused_before_ray(argv: list[str], experiment: Path,
                                                       tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    probe = ("import sys; from study.cli import main; rc = main(sys.argv[1:]);"
             " sys.exit(rc if 'ray' not in sys.modules else 99)")
    done = subprocess.run([sys.executable, "-c", probe, "resume", *argv],
                          cwd=tmp_path / "elsewhere", capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: study: no experiment directory") and "nope" in line


def test_a_folder_that_is_no_experiment_is_refused(experiment: Path, capsys) -> None:
    other = experiment.parent / "plain"
    other.mkdir()
    err = refused(["resume", str(other)], capsys)
    assert err.splitlines()[-1] == (f"  - resume: {str(other)!r} is not a dpstudy experiment "
                                    f"directory (no dpstudy-spec.yaml)")
