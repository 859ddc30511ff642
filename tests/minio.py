"""A MinIO server for the tests that need S3: started once per session on a loopback port with
a temporary data directory; a missing binary fails the tests, it never skips them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import boto3
import pytest

from benchmarks.common import (
    MINIO_PASSWORD,
    MINIO_USER,
    BenchmarkError,
    build_minio,
    free_port,
    minio_server,
)

BUCKET = "pulumid-blobs"


@pytest.fixture(scope="session")
def aws_env() -> Iterator[None]:
    """Credentials for boto3's default chain, and nothing else from this machine's AWS setup
    (no profile files, no instance metadata requests off loopback)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                mp.delenv(name)
        mp.setenv("AWS_ACCESS_KEY_ID", MINIO_USER)
        mp.setenv("AWS_SECRET_ACCESS_KEY", MINIO_PASSWORD)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="session")
def minio_endpoint(aws_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MinIO on a free loopback port with a temporary data dir and BUCKET created."""
    try:
        binary = build_minio()
    except BenchmarkError as e:
        pytest.fail(str(e), pytrace=False)
    workdir = tmp_path_factory.mktemp("minio")
    port = free_port()
    server = minio_server(
        binary, workdir, data=workdir / "data", port=port, console_port=free_port()
    )
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        client.close()
        yield endpoint
    finally:
        server.stop()


def s3_url(endpoint: str, prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}?endpoint={endpoint}&region=us-east-1&path_style=true"
