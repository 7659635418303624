"""Running studies on Ray Tune (imports Ray: the CLI loads it only when a study runs).

- :mod:`~study.execution.cluster`: connect to Ray, refuse trials no node can hold;
- :mod:`~study.execution.runner`: run, resume and confirm (the Tuner);
- :mod:`~study.execution.callbacks`: record finished trials in Parquet, show progress;
- :mod:`~study.execution.tune_state`: check and repair Tune's experiment state;
- :mod:`~study.execution.trackers`: MLflow and TensorBoard loggers;
- :mod:`~study.execution.lock`: one driver per study;
- :mod:`~study.execution.jobs`: studies submitted through the Ray Jobs API;
- :mod:`~study.execution.audit`: ``dpstudy audit`` runs.
"""
