"""dpstudy, the service: hyperparameter studies for DP image classification on Ray Tune.

Sub-packages by concept, in the order a study flows through them (each imports only the
ones before it; ``trainables`` runs one trial and never imports ``study``):

- :mod:`study.spec`: the study spec (YAML -> frozen model), its search space, the one table
  of hyperparameters, the JSON Schema;
- :mod:`study.storage`: locations (paths and URIs), the experiment directory's files, the
  Parquet results schema and store;
- :mod:`study.analysis`: selection on validation, queries and Pareto fronts, confirmation
  statistics;
- :mod:`study.privacy`: study-level privacy: tuning bounds, private selection and study
  budgets, release;
- :mod:`study.search`: the Optuna search space and searcher, and its persisted study;
- :mod:`study.execution`: run, resume and confirm on Ray Tune (cluster, callbacks, Tune
  state, trackers, lock, Jobs API, audit runs);
- :mod:`study.report`: ``status``, the HTML/Markdown report and its figures;
- :mod:`study.cli`: the ``dpstudy`` command.
"""
