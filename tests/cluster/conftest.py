"""Fixtures for the cluster tests: the session PostgreSQL (tests/postgres.py) and MinIO
(tests/minio.py), the e2e CLI fixtures (tests/e2e/conftest.py), and `start_cluster`.

- `start_cluster(size=3, **flags)`: a fresh database and S3 prefix, SIZE pulumid nodes on
  them and HAProxy in front (tests/cluster/harness.py); stopped at teardown, the database
  dropped. Point CLIs at `cluster.front` with `make_cli(version, cluster.front)` and
  `make_project(cli, cluster.front, ...)`.
- `cli_version`: the newest CLI version under test (3.259.0 by default) only.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.cluster.harness import Cluster, haproxy_binary
from tests.e2e.conftest import CLI_VERSIONS, make_cli, make_project, provider_dir, yaml_host_dir
from tests.minio import aws_env, minio_endpoint, s3_url
from tests.postgres import PostgresServer, postgres_server

__all__ = [
    "aws_env",
    "make_cli",
    "make_project",
    "minio_endpoint",
    "postgres_server",
    "provider_dir",
    "yaml_host_dir",
]

_CLUSTERS = pytest.StashKey[list[Cluster]]()


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


@pytest.fixture
def cli_version() -> str:
    return max(CLI_VERSIONS, key=_version_key)


@pytest.fixture
def start_cluster(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    postgres_server: PostgresServer,
    minio_endpoint: str,
) -> Iterator[Callable[..., Cluster]]:
    haproxy_binary()  # fail first, with the install command, when it is missing
    started: list[Cluster] = []
    databases: list[str] = []
    request.node.stash[_CLUSTERS] = started

    def start(size: int = 3, **flags: object) -> Cluster:
        database = postgres_server.create_database("cluster")
        databases.append(database)
        prefix = f"cluster-{uuid.uuid4().hex[:12]}"
        cluster = Cluster(
            tmp_path / f"cluster{len(started)}",
            database,
            s3_url(minio_endpoint, prefix),
            size=size,
            flags=dict(flags),
        )
        started.append(cluster)
        return cluster.start()

    yield start
    for cluster in started:
        cluster.stop()
    for database in databases:
        postgres_server.drop_database(database)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach the tail of every node's log and of HAProxy's."""
    report = yield
    if report.failed:
        for cluster in item.stash.get(_CLUSTERS, []):
            for index, node in enumerate(cluster.nodes):
                report.sections.append(
                    (f"pulumid node{index} log ({node.log_path})", node.log_text(tail=3000))
                )
            if cluster.proxy is not None:
                report.sections.append(
                    (f"haproxy log ({cluster.proxy.log_path})", cluster.proxy.log_text(3000))
                )
    return report
