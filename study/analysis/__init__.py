"""What a study's results say: pure functions over recorded rows.

- :mod:`~study.analysis.selection`: the configurations selected on validation;
- :mod:`~study.analysis.query`: filters, sorting, Pareto fronts and table formats;
- :mod:`~study.analysis.confirm`: confirmation plans and their statistics (t-intervals,
  paired differences).
"""
