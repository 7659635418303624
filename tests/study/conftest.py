"""Fixtures of the study tests: an S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def s3_root() -> Iterator[str]:
    """A bucket on a moto S3 server on 127.0.0.1, as a pyarrow URI with query options."""
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    import pyarrow.fs as pafs

    query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    fs, _ = pafs.FileSystem.from_uri(f"s3://dpstudy?{query}&allow_bucket_creation=true")
    fs.create_dir("dpstudy")
    try:
        yield f"s3://dpstudy/runs?{query}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
