"""Study-level privacy: what the tuning itself costs, computed with ``dp-accounting``.

- :mod:`~study.privacy.bounds`: the DP events and bounds of a whole study;
- :mod:`~study.privacy.private_selection`: private selection, the trial count, study budgets
  and the study's privacy statement;
- :mod:`~study.privacy.release`: ``dpstudy release``, what a guarantee covers.
"""
