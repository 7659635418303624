"""What a person reads about a study.

- :mod:`~study.report.status`: ``dpstudy status``;
- :mod:`~study.report.html`: the HTML or Markdown report, with its privacy sections from
  :mod:`~study.report.privacy`;
- :mod:`~study.report.plots` and :mod:`~study.report.study_plots`: its figures.
"""
