"""Private selection and study budgets: spec rules, the assumption checks behind `status`,
the scope: study calibration as the trials will run it, the recorded trial count, and
(slow) a real private-selection study through run, status and release."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from inprocess import dpstudy

from study.privacy import private_selection as ps
from study.privacy.bounds import (
    TrialMechanism,
    composition_epsilon,
    draw_trial_count,
    epsilon_of,
    selection_epsilon,
)
from study.privacy.release import ReleaseError, release
from study.report.status import study_privacy_lines
from study.spec.model import SpecError, StudySpec
from study.storage.store import ResultsStore
from trainables.accounting import epsilon_after, plan_budget
from trainables.config import PrivacyConfig

ROOT = Path(__file__).resolve().parents[3]
PRIVATE: dict[str, Any] = {
    "name": "ps", "dataset": {"name": "mnist-5k"},
    "privacy": {"scope": "study", "epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"},
    "search": {"mode": "private-selection", "trials": {"distribution": "geometric", "mean": 4},
               "prune_rate": [0.0, 0.5], "clip_norm": 1.0,
               "learning_rate": {"low": 1.0, "high": 3.0}, "batch_size": [256, 512],
               "epochs": [1, 2]},
    "validation": {"noise": 10.0}, "scheduler": "none",
}


def spec_of(**changes: Any) -> StudySpec:
    data = copy.deepcopy(PRIVATE)
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return StudySpec.from_dict(data)


def problems(**changes: Any) -> list[str]:
    with pytest.raises(SpecError) as err:
        spec_of(**changes)
    return err.value.problems


def test_private_spec_round_trips_and_defaults_to_random_search() -> None:
    spec = spec_of()
    assert spec.sampler == "random" and spec.trials is None
    assert spec.selection.trials.event_shape == 1.0
    assert StudySpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["search"]["mode"] == "private-selection"


@pytest.mark.parametrize("change,field,words", [
    ({"sampler": "tpe"}, "sampler:", "random"),
    ({"scheduler": "asha"}, "scheduler:", "ASHA"),
    ({"trials": 20}, "trials:", "remove trials"),
    ({"validation": None}, "validation.noise:", "DP score"),
    ({"search__epochs": {"low": 1, "high": 3}}, "search.epochs:", "continuous range"),
    ({"search__batch_size": {"low": 128, "high": 512}}, "search.batch_size:", "finite"),
    ({"search__noise_multiplier": 2.0, "search__epochs": None}, "search.noise_multiplier:",
     "calibrated"),
    ({"search__trials": {"distribution": "truncated-negative-binomial", "mean": 5}},
     "search.trials.shape:", "required"),
    ({"search__trials": {"distribution": "uniform", "mean": 5}}, "search.trials.distribution:",
     "must be one of"),
    ({"search__mode": "optimize", "search__trials": None, "trials": 4},
     "privacy.scope:", "private-selection"),
])
def test_spec_rules_name_the_field(change: dict[str, Any], field: str, words: str) -> None:
    found = [p for p in problems(**change) if p.startswith(field)]
    assert found and words in found[0], problems(**change)


def test_adaptive_fixed_asha_study_says_why_the_selection_bound_does_not_apply() -> None:
    quick = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec = StudySpec.from_dict(quick)
    reasons = ps.assumptions(spec, [])
    text = " | ".join(reasons)
    assert "'tpe'" in text and "fixed" in text and "'asha'" in text and "not DP" in text
    assert "continuous range" in text  # its noise multiplier is a range


def test_status_states_both_models(tmp_path: Path) -> None:
    spec = spec_of(**{"results": str(tmp_path / "r"),  # 3 drawn (runner)
                      "privacy__scope": "trial", "search__epochs": 1,
                      "search__batch_size": 256}).model_copy(update={"trials": 3})
    mechanism = ps.possible_mechanisms(spec, ps.train_size(spec))[0]
    store = ResultsStore(spec.results_path, spec.name)
    for i in range(3):
        store.add_trial({"trial_id": f"t{i}", "status": "completed", "stage": "search",
                         "sample_rate": mechanism.sample_rate,
                         "noise_multiplier": mechanism.noise_multiplier,
                         "steps": mechanism.steps, "val_noise": 10.0, "val_releases": 1,
                         "val_accuracy_dp": 0.5 + i / 10}, [])
    store.metadata.update(ps.study_privacy_metadata(spec, store))
    store.flush()
    recorded = ps.read_study_privacy(spec.results_path)
    assert recorded.epsilon_all == composition_epsilon([mechanism] * 3, 1e-5)
    assert recorded.epsilon_selected == selection_epsilon([mechanism], mean=4, shape=1.0,
                                                          delta=1e-5)
    lines = study_privacy_lines(spec.results_path)
    assert "everything released: epsilon" in lines[0]
    assert "only the selected result released: epsilon" in lines[1]
    # the plain validation scores of a private split and the training loss are no DP
    # release: the statement names them instead of claiming the whole table
    assert recorded.not_covered == ("train_loss", "test_accuracy", "best_test_accuracy",
                                    "test_loss", "val_accuracy", "best_val_accuracy",
                                    "val_loss")
    assert "not covered: train_loss, test_accuracy" in lines[2]
    # a TPE study over the same rows: the selection bound does not apply, and why
    tpe = spec_of(**{"results": str(tmp_path / "r"), "privacy__scope": "trial",
                     "search__mode": "optimize", "search__trials": None, "trials": 3,
                     "sampler": "tpe", "scheduler": "asha"})
    store.metadata.update(ps.study_privacy_metadata(tpe, store))
    store.add_trial(store.trials().to_pylist()[0], [])  # statements travel with new parts
    store.flush()
    lines = study_privacy_lines(spec.results_path)
    assert "does not apply" in lines[1] and "'tpe'" in lines[1] and "'asha'" in lines[1]
    assert "fixed" in lines[1]


    # release is refused, and nothing written, when the selection bound does not apply
    with pytest.raises(ReleaseError, match="does not apply"):
        release(tpe, store.trials().to_pylist(), spec.results_path, str(tmp_path / "out"),
                experiment=str(tmp_path))
    assert not (tmp_path / "out").exists()


def test_one_trial_everything_released_equals_its_epsilon() -> None:
    spec = spec_of(**{"privacy__scope": "trial", "search__epochs": 1,
                      "search__batch_size": 256})
    n = ps.train_size(spec)
    m = ps.possible_mechanisms(spec, n)[0]
    row = {"trial_id": "a", "status": "completed", "sample_rate": m.sample_rate,
           "noise_multiplier": m.noise_multiplier, "steps": m.steps, "val_noise": 10.0,
           "val_releases": 1}
    sp = ps.study_privacy_of(spec, [row], n, drawn=1)  # K = 1 drawn, and it completed
    assert sp.epsilon_all == epsilon_of(m.event(), 1e-5)
    assert sp.epsilon_selected > sp.epsilon_all  # a random K of mean 4 costs more


def test_scope_study_trials_meet_the_budget_as_they_will_run() -> None:
    spec = spec_of()
    n = ps.train_size(spec)
    budget = ps.plan_study_budget(spec, n)
    run = []
    for batch in (256, 512):
        for epochs in (1, 2):
            trial = ps.study_trial_config(spec.trial_config(
                {"prune_rate": 0.0, "learning_rate": 2.0, "batch_size": batch,
                 "epochs": epochs}), budget)
            q = batch / n
            plan = plan_budget(PrivacyConfig(**trial["privacy"]), sample_rate=q,
                               max_epochs=trial["optim"]["max_epochs"])
            assert plan.noise_multiplier == budget.noise_multiplier
            assert plan.steps == math.floor(epochs / q + 1e-9)  # every step of its epochs
            assert plan.epsilon == trial["privacy"]["epsilon"] == epsilon_after(
                plan.steps, noise_multiplier=plan.noise_multiplier, sample_rate=q,
                delta=1e-5, accountant="rdp", releases=(10.0,))
            run.append(TrialMechanism(sample_rate=q, noise_multiplier=plan.noise_multiplier,
                                      steps=plan.steps, val_noise=10.0, val_releases=1))
    spent = selection_epsilon(run, mean=4, shape=1.0, delta=1e-5)
    assert 0.99 * 3.0 <= spent <= 3.0
    assert budget.epsilon == pytest.approx(spent)


def test_trial_count_is_recorded_and_read_back(tmp_path: Path) -> None:
    spec = spec_of()
    previous = os.umask(0)
    try:
        count = ps.trial_count(spec, str(tmp_path))
    finally:
        os.umask(previous)
    assert (tmp_path / ps.TRIAL_COUNT_FILE).stat().st_mode & 0o777 == 0o600  # owner only
    recorded = json.loads((tmp_path / ps.TRIAL_COUNT_FILE).read_text())
    assert recorded["trials"] == count >= 1 and recorded["distribution"] == "geometric"
    assert all(ps.trial_count(spec, str(tmp_path)) == count for _ in range(3))
    fixed = spec_of(**{"privacy__scope": "trial", "search__mode": "optimize",
                       "search__trials": None, "trials": 7})
    assert ps.trial_count(fixed, str(tmp_path / "other")) == 7


@pytest.mark.slow
def test_private_selection_study_runs_states_and_releases(tmp_path: Path) -> None:
    data = copy.deepcopy(PRIVATE)
    data["search"].update(trials={"distribution": "poisson", "mean": 2}, batch_size=512,
                          epochs=1)
    data.update(storage=str(tmp_path / "runs"), results=str(tmp_path / "results"),
                max_concurrent=2)
    (tmp_path / "ps.yaml").write_text(yaml.safe_dump(data))
    cli = dpstudy  # in this process, on the embedded Ray the tests share

    # the draw is random (OS entropy); a recorded count is what run and resume use, and it
    # must be the draw of its recorded seed: pick a seed whose draw is 2
    (tmp_path / "runs" / "ps").mkdir(parents=True)
    (tmp_path / "runs" / "ps" / ps.TRIAL_COUNT_FILE).write_text(json.dumps(
        count_record(2, distribution="poisson", mean=2)))
    out = cli("run", str(tmp_path / "ps.yaml"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "study budget epsilon=3" in out.stdout and "per trial: noise multiplier" in out.stdout
    assert "2 completed" in out.stdout
    status = cli("status", "--storage", str(tmp_path / "runs")).stdout
    assert "2/2 finished" in status
    assert "everything released: epsilon" in status and "composition of 2 trials" in status
    assert "only the selected result released: epsilon 2.9" in status
    release = cli("release", str(tmp_path / "results"), "--out", str(tmp_path / "rel"))
    assert release.returncode == 0, release.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "rel")) == ["PRIVATE.txt", "model.pt", "release.json"]
    doc = json.loads((tmp_path / "rel" / "release.json").read_text())
    assert doc["score"]["metric"] == "val_accuracy_dp"
    assert doc["study_privacy"]["epsilon"] <= 3.0
    text = json.dumps(doc)
    assert "seed" not in text and "test_accuracy" not in text and "val_accuracy\"" not in text
    again = cli("release", str(tmp_path / "results"), "--out", str(tmp_path / "rel"))
    assert again.returncode == 2 and "empty directory" in again.stderr


def test_validation_noise_from_a_share_of_the_budget() -> None:
    from dp_accounting.dp_event import GaussianDpEvent

    spec = spec_of(validation={"share": 0.1})
    noise = spec.trial_config({"prune_rate": 0.0, "learning_rate": 2.0, "batch_size": 256,
                               "epochs": 1})["privacy"]["validation_noise"]
    assert epsilon_of(GaussianDpEvent(noise), 1e-5) == pytest.approx(0.3, rel=1e-3)
    budget = ps.plan_study_budget(spec, ps.train_size(spec))
    assert budget.epsilon <= 3.0
    both = problems(validation={"noise": 5.0, "share": 0.1})
    assert any(p.startswith("validation.noise: give either noise or share") for p in both)
    assert any(p.startswith("validation.share: must be < 1") for p in
               problems(validation={"share": 1.5}))


def test_non_dp_columns_follow_the_validation_split() -> None:
    """Plain validation scores cost nothing on a public split, and are named as not covered
    on a private one; the training loss (private batches, no noise) is never covered."""
    private = spec_of()
    public = spec_of(dataset__public={"size": 500}, dataset__validation={"public": True},
                     validation=None, search__mode="optimize", search__trials=None,
                     trials=2, privacy__scope="trial")
    test = ("test_accuracy", "best_test_accuracy", "test_loss")  # never DP (PRIVATE.txt)
    assert ps.non_dp_columns(private) == ("train_loss", *test, "val_accuracy",
                                          "best_val_accuracy", "val_loss")
    assert ps.non_dp_columns(public) == ("train_loss", *test)


def count_record(count: int, *, distribution: str = "geometric", mean: float = 4,
                 shape: float | None = None) -> dict[str, Any]:
    """A trial-count file as ``trial_count`` writes it, for a seed whose draw is ``count``."""
    seed = next(s for s in range(10_000) if draw_trial_count(
        distribution, mean=mean, shape=shape, seed=s) == count)
    return {"trials": count, "seed": seed, "distribution": distribution, "mean": mean,
            "shape": shape}


def completed_rows(spec: StudySpec, k: int, **extra: Any) -> list[dict[str, Any]]:
    m = ps.possible_mechanisms(spec, ps.train_size(spec))[0]
    return [{"trial_id": f"t{i}", "status": "completed", "stage": "search",
             "sample_rate": m.sample_rate, "noise_multiplier": m.noise_multiplier,
             "steps": m.steps, "val_noise": 10.0, "val_releases": 1,
             "val_accuracy_dp": 0.5 + i / 10, **extra} for i in range(k)]


def test_interrupted_private_selection_is_neither_bounded_nor_released(tmp_path: Path) -> None:
    """Papernot-Steinke bound the best of all K drawn runs: a study stopped after 1 of its
    K = 3 drawn trials states no selection bound and is not released."""
    spec = spec_of(**{"results": str(tmp_path / "r"), "privacy__scope": "trial",
                      "search__epochs": 1, "search__batch_size": 256})
    experiment = tmp_path / "runs" / "ps"
    experiment.mkdir(parents=True)
    (experiment / ps.TRIAL_COUNT_FILE).write_text(json.dumps(count_record(3)))
    assert ps.trial_count(spec, str(experiment)) == 3
    store = ResultsStore(spec.results_path, spec.name)
    for row in completed_rows(spec, 3)[:1]:
        store.add_trial(row, [])
    store.metadata.update(ps.study_privacy_metadata(spec.model_copy(update={"trials": 3}),
                                                    store))
    store.flush()
    recorded = ps.read_study_privacy(spec.results_path)
    assert recorded.epsilon_selected is None
    assert "1 of the 3 drawn search trials completed" in " ".join(recorded.failed_assumptions)
    assert "does not apply" in study_privacy_lines(spec.results_path)[1]
    with pytest.raises(ReleaseError, match="1 of the 3 drawn"):
        release(spec, store.trials().to_pylist(), spec.results_path, str(tmp_path / "out"),
                experiment=str(experiment))
    assert not (tmp_path / "out").exists()
    rows = completed_rows(spec, 3)
    done = ps.study_privacy_of(spec, rows, ps.train_size(spec), drawn=3)
    assert done.epsilon_selected is not None  # all three completed: the bound applies
    failed = [{**rows[0], "status": "failed"}, *rows[1:]]
    assert ps.study_privacy_of(spec, failed, ps.train_size(spec), drawn=3).epsilon_selected \
        is None
    assert ps.study_privacy_of(spec, rows, ps.train_size(spec), drawn=4).epsilon_selected \
        is None


@pytest.mark.parametrize("record", [
    {"trials": 2},  # a fixed count, no seed: the slow test's old file
    {**count_record(3), "trials": 2},  # a count other than its seed's draw
    {**count_record(3), "mean": 10},  # drawn from another distribution
])
def test_a_count_file_not_drawn_from_its_seed_is_refused(tmp_path: Path,
                                                         record: dict[str, Any]) -> None:
    spec = spec_of(**{"results": str(tmp_path / "r")})
    (tmp_path / ps.TRIAL_COUNT_FILE).write_text(json.dumps(record))
    with pytest.raises(SpecError) as err:
        ps.trial_count(spec, str(tmp_path))
    (problem,) = err.value.problems
    assert problem.startswith(str(tmp_path / ps.TRIAL_COUNT_FILE) + ": must record the trial "
                              "count drawn") and "(got {" in problem
    with pytest.raises(ReleaseError, match="must record the trial count drawn"):
        release(spec, [], spec.results_path, str(tmp_path / "out"), experiment=str(tmp_path))


def test_reproducible_noise_withholds_both_bounds(tmp_path: Path) -> None:
    """Seeded noise: every trial draws the same noise, so two trials can cancel it; neither
    the composition nor the selection bound holds, wherever the bounds are shown."""
    from study.report.privacy import privacy_blocks

    spec = spec_of(**{
        "results": str(tmp_path / "r"), "privacy__scope": "trial", "search__epochs": 1,
        "search__batch_size": 256, "reproducible_noise": True}).model_copy(update={"trials": 3})
    store = ResultsStore(spec.results_path, spec.name)
    for row in completed_rows(spec, 3, reproducible_noise=True):
        store.add_trial(row, [])
    store.metadata.update(ps.study_privacy_metadata(spec, store))
    store.flush()
    recorded = ps.read_study_privacy(spec.results_path)
    assert recorded.epsilon_all is None and recorded.epsilon_selected is None
    lines = study_privacy_lines(spec.results_path)
    assert len(lines) == 2 and all("withheld: reproducible_noise is on" in ln for ln in lines)
    report = str(privacy_blocks(spec.results_path))
    assert "withheld: reproducible_noise" in report and not re.search(r"epsilon \d", report)
    # rows recorded with seeded noise withhold the bounds even if the spec says otherwise
    plain = spec.model_copy(update={"reproducible_noise": False})
    rows = store.trials().to_pylist()
    assert ps.study_privacy_of(plain, rows, ps.train_size(spec)).epsilon_all is None
    assert ps.assumptions(spec, []) and "reproducible_noise" in ps.assumptions(spec, [])[0]
    budget = ps.plan_study_budget(spec_of(), ps.train_size(spec))
    seeded = spec_of(reproducible_noise=True)
    assert "withheld: reproducible_noise" in budget.describe(seeded)
    assert "(selection bound" not in budget.describe(seeded)


def test_no_pinned_baseline_trial_in_private_selection() -> None:
    """A pinned first trial (prune 0, drop 0) would make the K runs not identical and
    independent; private selection draws every trial at random."""
    from study.search.space import baseline_point, make_search

    spec = spec_of()
    assert spec.baseline_trial and spec.search.prune_rate.choices == (0.0, 0.5)
    assert baseline_point(spec) == {}
    assert not make_search(spec, None).searcher._points_to_evaluate
    optimize = spec_of(**{"search__mode": "optimize", "search__trials": None, "trials": 4,
                          "privacy__scope": "trial", "validation": None})
    assert baseline_point(optimize) == {"prune_rate": 0.0}


def test_audit_runs_appear_in_the_study_statement(tmp_path: Path) -> None:
    """Each `dpstudy audit` re-trains on the private data: its run is composed into
    'everything released', its test accuracy named as not covered, and the selection bound
    withdrawn (the audit is a release outside the selection)."""
    from study.report.privacy import privacy_blocks
    from study.storage.audits import append_audit

    spec = spec_of(**{
        "results": str(tmp_path / "r"), "privacy__scope": "trial", "search__epochs": 1,
        "search__batch_size": 256}).model_copy(update={"trials": 3})
    rows = completed_rows(spec, 3)
    store = ResultsStore(spec.results_path, spec.name)
    for row in rows:
        store.add_trial(row, [])
    store.metadata.update(ps.study_privacy_metadata(spec, store))
    store.flush()
    before = ps.read_study_privacy(spec.results_path, spec.name)
    assert before.epsilon_selected is not None and before.audits == 0
    m = ps.mechanism_of(rows[0])
    append_audit(spec.results_path, {
        "study": spec.name, "audit_id": "a" * 12, "trial_id": "t0", "mode": "white-box",
        "canaries": 100, "included": 50, "confidence": 0.95, "delta": 1e-5,
        "epsilon_target": 3.0, "epsilon_claimed": 2.9, "epsilon_audited": 0.3,
        "violation": 0, "noise_multiplier": m.noise_multiplier, "clip_norm": 1.0,
        "sample_rate": m.sample_rate, "steps": m.steps, "prune_rate": 0.0, "drop_rate": 0.0,
        "test_accuracy": 0.8, "wall_time_s": 1.0, "node": "n", "seed": 0})
    after = ps.read_study_privacy(spec.results_path, spec.name)
    audit_run = dataclasses.replace(m, val_noise=None, val_releases=0)
    assert after.audits == 1 and after.epsilon_selected is None
    assert after.epsilon_all == pytest.approx(composition_epsilon([m] * 3 + [audit_run], 1e-5))
    assert after.epsilon_all > before.epsilon_all
    assert "audits.test_accuracy" in after.not_covered
    lines = study_privacy_lines(spec.results_path, spec.name)
    assert "composition of 3 trials and 1 audit runs" in lines[0]
    assert "audit runs (dpstudy audit) re-trained" in lines[1]
    assert "1 audit runs" in str(privacy_blocks(spec.results_path, spec.name))
    with pytest.raises(ReleaseError, match="audit runs"):
        release(spec, rows, spec.results_path, str(tmp_path / "out"), experiment=str(tmp_path))


def test_run_refuses_a_hand_written_count_before_ray_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from study.execution import cluster, runner

    spec = spec_of(storage=str(tmp_path / "runs"), results=str(tmp_path / "r"))
    experiment = tmp_path / "runs" / "ps"
    experiment.mkdir(parents=True)
    (experiment / ps.TRIAL_COUNT_FILE).write_text(json.dumps({"trials": 2}))
    monkeypatch.setattr(cluster, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(SpecError, match="must record the trial count drawn"):
        runner.run(spec, None)
    written = [n for n in os.listdir(experiment) if not n.startswith(".")]  # .dpstudy-lock
    assert written == [ps.TRIAL_COUNT_FILE]  # no spec, no Tune state


def test_progress_and_status_of_a_private_selection_study_show_counts_not_scores(
        tmp_path: Path) -> None:
    """A score seen mid-study invites a data-dependent stop: neither the live progress line
    nor `status` shows one in private selection."""
    from types import SimpleNamespace

    from study.execution.callbacks import StudyCallback
    from study.report.status import study_status

    spec = spec_of(**{
        "results": str(tmp_path / "r"), "storage": str(tmp_path / "runs"),
        "privacy__scope": "trial", "search__epochs": 1, "search__batch_size": 256,
    }).model_copy(update={"trials": 3})
    done = SimpleNamespace(status="TERMINATED", last_result={
        "finished": True, "val_accuracy": 0.5175, "val_accuracy_dp": 0.5012})
    line = StudyCallback(spec).progress_line([done])
    assert "1/3 done" in line and "withheld (private selection)" in line
    assert "0.51" not in line and "0.50" not in line
    experiment = tmp_path / "runs" / "ps"
    experiment.mkdir(parents=True)
    (experiment / ps.TRIAL_COUNT_FILE).write_text(json.dumps(count_record(3)))
    (experiment / "dpstudy-spec.yaml").write_text(yaml.safe_dump(
        spec.model_copy(update={"trials": None}).to_dict()))
    store = ResultsStore(spec.results_path, spec.name)
    store.add_trial(completed_rows(spec, 1)[0], [])
    store.flush()
    status = study_status(str(experiment))
    assert "1/3 finished" in status and "withheld (private selection)" in status
    assert "0.5000" not in status
    # a complete study whose count file no longer is its seed's draw: no selection bound
    for row in completed_rows(spec, 3):
        store.add_trial(row, [])
    store.metadata.update(ps.study_privacy_metadata(spec, store))
    store.flush()
    assert "only the selected result released: epsilon" in study_status(str(experiment))
    (experiment / ps.TRIAL_COUNT_FILE).write_text(json.dumps({"trials": 3}))
    refused = study_status(str(experiment))
    assert "trial count refused" in refused
    assert "only the selected result released: bound does not apply: trial count" in refused


def test_a_statement_from_a_newer_version_is_read_without_its_new_fields(
        tmp_path: Path) -> None:
    """A results root shared with a newer dpstudy, whose statement has a field this version
    does not know: status and release read the fields they know."""
    store = ResultsStore(str(tmp_path), "s1")
    store.metadata[ps.PRIVACY_METADATA_KEY] = json.dumps({
        "delta": 1e-5, "trials": 1, "epsilon_all": 2.0, "epsilon_selected": None,
        "failed_assumptions": ["x"], "not_covered": [], "composition_failed": [],
        "audits": 0, "accountant_version": "newer"})
    store.add_trial({"trial_id": "a", "status": "completed"}, [])
    store.flush()
    recorded = ps.read_study_privacy(str(tmp_path))
    assert (recorded.epsilon_all, recorded.failed_assumptions) == (2.0, ("x",))
    assert study_privacy_lines(str(tmp_path))[0].startswith(
        "study privacy, everything released: epsilon 2.000")
