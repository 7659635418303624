"""The search: Optuna behind Ray Tune's ``OptunaSearch``.

- :mod:`~study.search.space`: the define-by-run space, cut per trial to the noise that
  spends the budget, and the searcher;
- :mod:`~study.search.persisted`: each study's Optuna study, persisted in its experiment
  directory.
"""
