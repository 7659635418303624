"""The Optuna study persisted in a journal: the searcher writes it, a resume restores from it,
and every finished trial is in it exactly once."""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from study.search import persisted as optuna_storage
from study.search.space import TUNE_TRIAL_ID, StudySearch, make_search
from study.spec.model import StudySpec

SPEC = {"name": "journal", "trials": 5, "privacy": {"epsilon": 3.0},
        "search": {"prune_rate": {"low": 0.0, "high": 0.8}, "clip_norm": 1.0,
                   "noise_multiplier": 1.5, "learning_rate": {"low": 0.1, "high": 2.0},
                   "batch_size": 256, "max_epochs": 1}}


def searcher(tmp_path: Path) -> StudySearch:
    storage = optuna_storage.experiment_storage(str(tmp_path / "journal"))
    return make_search(StudySpec.from_dict(SPEC), None, storage).searcher


def finish(search: StudySearch, trial_id: str, accuracy: float) -> None:
    search.on_trial_complete(trial_id, {"val_accuracy": accuracy, "finished": True})


def journal_trials(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna_storage.load_study(str(tmp_path / "journal"), "journal")
    assert study is not None
    return study.trials


def test_journal_in_the_experiment_directory(tmp_path: Path) -> None:
    search = searcher(tmp_path)
    config = search.suggest("t1")
    assert config["prune_rate"] == 0.0  # the baseline point comes first
    finish(search, "t1", 0.5)
    assert (tmp_path / "journal" / optuna_storage.JOURNAL_FILE).is_file()
    [trial] = journal_trials(tmp_path)
    assert trial.state == TrialState.COMPLETE and trial.value == 0.5
    assert trial.user_attrs[TUNE_TRIAL_ID] == "t1" and trial.params == config
    assert optuna_storage.load_study(str(tmp_path / "journal"), "other") is None
    assert optuna_storage.load_study(str(tmp_path / "none"), "journal") is None
    assert optuna_storage.experiment_storage("s3://bucket/runs/journal") is None


@pytest.mark.parametrize("moved", [False, True], ids=["in place", "directory moved"])
def test_resume_restores_from_the_journal_each_finished_trial_once(
        tmp_path: Path, moved: bool) -> None:
    search = searcher(tmp_path)
    blank = pickle.dumps(search)  # Tune pickles the searcher into tuner.pkl at the start
    search.suggest("t1")
    search.suggest("t2")
    finish(search, "t1", 0.5)
    state = tmp_path / "journal" / "searcher-state.pkl"
    search.save(str(state))  # Tune's last experiment checkpoint before the kill
    finish(search, "t2", 0.6)  # told, but after the last checkpoint
    search.suggest("t3")  # asked, never started: the driver is killed here
    if moved:
        (tmp_path / "journal").rename(tmp_path / "journal2")
        state = tmp_path / "journal2" / "searcher-state.pkl"

    restored = pickle.loads(blank)
    restored.restore(str(state))
    journal = tmp_path / ("journal2" if moved else "journal")
    assert optuna_storage.journal_path(str(journal)) == str(
        journal / optuna_storage.JOURNAL_FILE)
    finish(restored, "t2", 0.61)  # Tune re-runs t2's last epoch and reports it again
    for trial_id, accuracy in (("t4", 0.7), ("t5", 0.4)):
        assert restored.suggest(trial_id) is not None
        finish(restored, trial_id, accuracy)

    study = optuna_storage.load_study(str(journal), "journal")
    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    ids = [t.user_attrs[TUNE_TRIAL_ID] for t in finished]
    assert sorted(ids) == ["t1", "t2", "t4", "t5"]  # each exactly once
    assert {t.user_attrs[TUNE_TRIAL_ID]: t.value for t in finished}["t2"] == 0.6
    states = {t.user_attrs[TUNE_TRIAL_ID]: t.state for t in study.trials}
    assert states["t3"] == TrialState.FAIL  # the orphan is not left running
    assert len(study.trials) == 5
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]


def test_a_trial_told_before_the_kill_reports_its_rerun_epochs_without_error(
        tmp_path: Path) -> None:
    """After a kill -9 Tune re-runs the last epochs of a trial that Optuna was already told
    about: Optuna refuses to update a finished trial, so those epochs are not sent to it
    (that refusal ended the resumed study), while an unfinished trial's epochs still are."""
    search = searcher(tmp_path)
    blank = pickle.dumps(search)
    search.suggest("t1")
    search.suggest("t2")
    state = tmp_path / "journal" / "searcher-state.pkl"
    search.save(str(state))  # the last checkpoint: both trials running
    finish(search, "t1", 0.5)  # told, then the driver is killed

    restored = pickle.loads(blank)
    restored.restore(str(state))
    assert restored.told_before_restore("t1") and not restored.told_before_restore("t2")
    for trial_id in ("t1", "t2"):
        restored.on_trial_result(trial_id, {"val_accuracy": 0.55, "training_iteration": 2})
    finish(restored, "t1", 0.51)
    finish(restored, "t2", 0.6)

    study = optuna_storage.load_study(str(tmp_path / "journal"), "journal")
    by_id = {t.user_attrs[TUNE_TRIAL_ID]: t for t in study.trials}
    assert by_id["t1"].value == 0.5 and by_id["t1"].intermediate_values == {}
    assert by_id["t2"].value == 0.6 and by_id["t2"].intermediate_values == {2: 0.55}
