"""Where a study's files live and what they hold.

- :mod:`~study.storage.locations`: local paths and URIs (one filesystem helper);
- :mod:`~study.storage.experiment`: the experiment directory's saved spec;
- :mod:`~study.storage.results`: the Parquet schema (versioned) and the results store.
"""
