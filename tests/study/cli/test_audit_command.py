"""``dpstudy audit``: target resolution, audits.parquet, bad input, and one real audit."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from study.cli import main
from study.execution import audit
from study.spec.model import load_spec
from study.storage.audits import append_audit, read_audits
from study.storage.experiment import results_spec_name, save_spec
from study.storage.schema import AUDITS_FILE
from study.storage.store import ResultsStore
from trainables.accounting import plan_budget
from trainables.config import TrialConfig
from trainables.data import dataset_size

SPEC: dict[str, Any] = {
    "name": "aud", "seed": 0, "dataset": {"name": "mnist-5k"},
    "model": {"name": "cnn-mnist", "width": 0.5}, "device": "cpu",
    "privacy": {"epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"},
    "search": {"drop_rate": {"low": 0.0, "high": 0.9}, "clip_norm": 1.0,
               "noise_multiplier": {"low": 2.0, "high": 4.0}, "learning_rate": 1.0,
               "batch_size": 1000, "max_epochs": {"low": 2, "high": 8}},
    "trials": 2, "scheduler": {"name": "none"},
}


def write_spec(tmp_path: Path, change=None) -> Path:
    spec = copy.deepcopy(SPEC)
    spec["storage"], spec["results"] = str(tmp_path / "runs"), str(tmp_path / "results")
    if change:
        change(spec)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def recorded_trial(tmp_path: Path, spec_path: Path, *, with_params: bool = True
                   ) -> dict[str, Any]:
    """A trial as a study records it: its plan from the accountant, its row in Parquet
    (with its sampled ``params``, or without as in schema-1 files), the spec saved next
    to Tune's state and in the results directory."""
    spec = load_spec(spec_path)
    params = {"drop_rate": 0.5, "noise_multiplier": 3.1, "max_epochs": 3.3}
    cfg = TrialConfig.from_dict(spec.trial_config(params))
    n = dataset_size(cfg.dataset, seed=cfg.seed)
    plan = plan_budget(cfg.privacy, sample_rate=cfg.optim.batch_size / n,
                       max_epochs=cfg.optim.max_epochs)
    row = {"trial_id": "t1", "status": "completed", "drop_rate": 0.5, "prune_rate": 0.0,
           "clip_norm": 1.0, "noise_multiplier": plan.noise_multiplier, "learning_rate": 1.0,
           "batch_size": 1000, "sample_rate": plan.sample_rate, "epsilon_target": 2.0,
           "epsilon_spent": plan.epsilon, "delta": 1e-5, "steps": plan.steps,
           "epochs": plan.steps * plan.sample_rate, "test_accuracy": 0.5, "seed": 0,
           "val_accuracy": 0.5,
           "pruning_criterion": "random", "pruning_scope": "global",
           "pruning_granularity": "unstructured", "dropping_criterion": "random",
           "stage": "search", "params": json.dumps(params) if with_params else None}
    store = ResultsStore(spec.results_path, spec.name)
    store.add_trial(row, [])
    store.flush()
    save_spec(spec, str(tmp_path / "runs" / spec.name))
    save_spec(spec, spec.results_path, results_spec_name(spec.name))
    return {"row": row, "plan": plan}


@pytest.mark.parametrize("with_params", [True, False])
def test_recorded_trial_is_reproduced_exactly(tmp_path: Path, with_params: bool) -> None:
    spec_path = write_spec(tmp_path)
    rec = recorded_trial(tmp_path, spec_path, with_params=with_params)
    for target in (str(spec_path), str(tmp_path / "results"), str(tmp_path / "runs" / "aud")):
        t = audit.resolve(target, trial="t1")
        cfg = TrialConfig.from_dict(t.config)
        plan = plan_budget(cfg.privacy, sample_rate=rec["plan"].sample_rate,
                           max_epochs=cfg.optim.max_epochs)
        assert (plan.steps, plan.noise_multiplier) == (rec["plan"].steps,
                                                        rec["plan"].noise_multiplier)
        assert cfg.dropping.rate == 0.5 and t.trial_id == "t1"
    assert audit.resolve(str(spec_path), best=True).trial_id == "t1"


def test_audits_parquet_appends_and_refuses_duplicates(tmp_path: Path) -> None:
    row = {"study": "s", "audit_id": "a1", "trial_id": "t1", "mode": "white-box",
           "canaries": 10, "included": 4, "confidence": 0.95, "delta": 1e-5,
           "epsilon_claimed": 2.0, "epsilon_audited": 0.5, "violation": 0}
    append_audit(str(tmp_path), row)
    append_audit(str(tmp_path), {**row, "audit_id": "a2", "epsilon_audited": 3.0,
                                 "violation": 1})
    table = read_audits(str(tmp_path))
    assert table.column("audit_id").to_pylist() == ["a1", "a2"]
    assert table.schema.field("epsilon_audited").metadata[b"doc"]
    before = sorted((tmp_path / AUDITS_FILE).iterdir())
    assert len(before) == 2  # one immutable part per audit: concurrent audits never clash
    with pytest.raises(ValueError, match="audit_id 'a1' already recorded"):
        append_audit(str(tmp_path), row)
    with pytest.raises(ValueError, match="mode must be one of"):
        append_audit(str(tmp_path), {**row, "audit_id": "a3", "mode": "grey-box"})
    with pytest.raises(ValueError, match="column 'canaries' expects int64"):
        append_audit(str(tmp_path), {**row, "audit_id": "a4", "canaries": "many"})
    assert sorted((tmp_path / AUDITS_FILE).iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [AUDITS_FILE]


BAD = {
    "unknown trial": (["--trial", "nope"], "audit: --trial: no trial 'nope'"),
    "searched spec, no trial": ([], "give --trial ID or --best"),
    "trial and best": (["--trial", "t1", "--best"], "at most one of --trial ID and --best"),
    "too few canaries": (["--trial", "t1", "--canaries", "1"],
                         "audit.canaries: must be an integer >= 2 (got 1)"),
    "confidence": (["--trial", "t1", "--confidence", "1.2"],
                   "audit.confidence: must be in (0, 1) (got 1.2)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2_nothing_written(case: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    spec_path = write_spec(tmp_path)
    recorded_trial(tmp_path, spec_path)
    args, message = BAD[case]
    assert main(["audit", str(spec_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "results" / AUDITS_FILE).exists()


def test_missing_extra_names_it(tmp_path: Path, capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    spec_path = write_spec(tmp_path)
    recorded_trial(tmp_path, spec_path)
    monkeypatch.setitem(sys.modules, "jax_privacy", None)
    assert main(["audit", str(spec_path), "--trial", "t1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: dpstudy audit needs jax-privacy for its bound; install it with "
                   "pip install 'dpstudy[audit]'")
    assert not (tmp_path / "results" / AUDITS_FILE).exists()


@pytest.mark.slow
def test_audit_a_recorded_trial_on_ray(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("jax_privacy")
    spec_path = write_spec(tmp_path)
    rec = recorded_trial(tmp_path, spec_path)
    assert main(["audit", str(tmp_path / "results"), "--trial", "t1", "--canaries", "300"]) == 0
    out = capsys.readouterr().out
    assert "white-box audit of trial t1: claimed epsilon" in out
    rows = read_audits(str(tmp_path / "results")).to_pylist()
    assert len(rows) == 1
    row = rows[0]
    assert (row["study"], row["trial_id"], row["canaries"]) == ("aud", "t1", 300)
    assert row["steps"] == rec["plan"].steps
    assert row["epsilon_claimed"] == pytest.approx(rec["row"]["epsilon_spent"])
    assert 0 <= row["epsilon_audited"] <= row["epsilon_claimed"] and row["violation"] == 0
    assert row["node"] and row["wall_time_s"] > 0


def test_report_shows_claimed_vs_audited(tmp_path: Path) -> None:
    from study.report.privacy import audit_blocks

    results = str(tmp_path / "results")
    assert audit_blocks(results, "aud") == []  # no audits yet: no section
    append_audit(results, {"study": "aud", "audit_id": "a1", "trial_id": "t1",
                           "mode": "white-box", "canaries": 1000, "included": 500,
                           "confidence": 0.95, "delta": 1e-5, "epsilon_claimed": 1.996,
                           "epsilon_audited": 0.5, "violation": 0})
    blocks = audit_blocks(results, "aud")
    assert blocks[0] == ("h2", "Privacy audits: claimed vs audited epsilon")
    table = blocks[-1][1]
    assert table[["trial_id", "epsilon_claimed", "epsilon_audited"]].values.tolist() == [
        ["t1", 1.996, 0.5]]
    assert audit_blocks(results, "other-study") == []


@pytest.mark.parametrize("audited, code", [(0.4, 0), (3.5, 1)])
def test_violation_is_recorded_and_fails_the_command(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        audited: float, code: int) -> None:
    """The CLI's wiring after the run (row, printed line, exit code), with the Ray task
    replaced by a result such as a sabotaged mechanism gives (real runs: tests/trainables)."""
    pytest.importorskip("jax_privacy")
    spec_path = write_spec(tmp_path)
    recorded_trial(tmp_path, spec_path)
    result = {"mode": "white-box", "canaries": 100, "included": 52, "confidence": 0.95,
              "delta": 1e-5, "epsilon_claimed": 1.996, "epsilon_audited": audited,
              "noise_multiplier": 2.5, "sample_rate": 0.25, "steps": 16,
              "test_accuracy": 0.5, "wall_time_s": 2.0, "node": "here"}
    monkeypatch.setattr(audit, "run_remote", lambda *a, **k: result)
    assert main(["audit", str(spec_path), "--best", "--canaries", "100"]) == code
    out = capsys.readouterr().out
    assert ("VIOLATION" in out) == bool(code)
    row = read_audits(str(tmp_path / "results")).to_pylist()[0]
    assert (row["trial_id"], row["violation"], row["epsilon_audited"]) == ("t1", code, audited)
