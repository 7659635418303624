"""Each study's Optuna study, persisted in its experiment directory.

The searcher (:class:`study.search.space.StudySearch`) writes every trial it asks and tells
to Optuna's ``JournalStorage`` in ``STORAGE/NAME/optuna-journal.log``, which the Optuna
tools read live and afterwards (``optuna-dashboard ~/dpstudy-runs/NAME/optuna-journal.log``,
:func:`load_study`). On ``dpstudy resume`` the searcher is restored from it
(:func:`reattach`): Tune's pickled searcher state only maps Tune trials to Optuna trials;
the trials' states and values are replayed from the journal, which may be newer.

Only a local (or mounted) experiment directory can hold the journal; with a URI storage
(``s3://...``) the searcher keeps its Optuna study in memory and in Tune's pickled state.
"""

from __future__ import annotations

import os
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

JOURNAL_FILE = "optuna-journal.log"


def journal_path(experiment: str) -> str | None:
    """The journal file of an experiment directory (``STORAGE/NAME``); None for a URI."""
    if "://" in experiment:
        return None
    return os.path.join(os.path.abspath(os.path.expanduser(experiment)), JOURNAL_FILE)


def open_storage(path: str) -> JournalStorage:
    """Optuna's journal storage on the file ``path`` (created if absent)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return JournalStorage(JournalFileBackend(path))


def experiment_storage(experiment: str) -> JournalStorage | None:
    """The journal storage of an experiment directory; None where it cannot live (a URI)."""
    path = journal_path(experiment)
    return None if path is None else open_storage(path)


def load_study(experiment: str, study_name: str) -> optuna.Study | None:
    """The persisted Optuna study of an experiment directory, for Optuna's plots and
    importances; None if the directory holds no journal (a URI storage, an older study)."""
    path = journal_path(experiment)
    if path is None or not os.path.isfile(path):
        return None
    storage = open_storage(path)
    if study_name not in optuna.get_all_study_names(storage):
        return None
    return optuna.load_study(study_name=study_name, storage=storage)


def restored_journal(storage: Any, state_file: str) -> str | None:
    """The journal a restored searcher reads: the file its pickled ``storage`` names, else
    the one beside Tune's searcher ``state_file`` (an experiment directory that was moved);
    None when neither exists."""
    backend = getattr(storage, "_backend", None)  # JournalStorage keeps no public accessor
    named = getattr(backend, "_file_path", None)
    beside = os.path.join(os.path.dirname(os.path.abspath(state_file)), JOURNAL_FILE)
    return next((p for p in (named, beside) if p and os.path.isfile(p)), None)


def reattach(study: optuna.Study, trials: dict[str, Any],
             storage: JournalStorage) -> optuna.Study:
    """``study`` reloaded from ``storage``, every one of the restored searcher's ``trials``
    (by Tune trial id) re-pointed at it. A trial still RUNNING that no Tune trial owns was
    asked by a driver killed before it saved its state: Tune will never run it, so it is
    told FAIL (the dashboard would otherwise show it running for ever)."""
    fresh = optuna.load_study(study_name=study.study_name, storage=storage,
                              sampler=study.sampler, pruner=study.pruner)
    for trial in trials.values():
        trial.study, trial.storage = fresh, storage
    owned = {t.number for t in trials.values()}
    for frozen in fresh.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if frozen.number not in owned:
            fresh.tell(frozen.number, state=TrialState.FAIL)
    return fresh
