"""Where a study's files live and what they hold.

- :mod:`~study.storage.locations`: local paths and URIs (one filesystem helper);
- :mod:`~study.storage.experiment`: the experiment directory's saved spec;
- :mod:`~study.storage.schema`: the Parquet schema (documented, versioned) and row checks;
- :mod:`~study.storage.store`: the results store (staged, immutable part files);
- :mod:`~study.storage.read`: reading results tables through ``pyarrow.dataset``;
- :mod:`~study.storage.audits`: the audits table.
"""
