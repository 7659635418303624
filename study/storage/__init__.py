"""Where a study's files live and what they hold: locations, the experiment directory's spec,
the Parquet schema, the results store and its readers, the audits table."""
