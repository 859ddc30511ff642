"""Fixtures for the end-to-end tests: a live `twistd pulumid` and the real `pulumi` CLI.

- `cli_versions`: the CLI versions under test (env PULUMID_E2E_CLI_VERSIONS,
  default "3.259.0,3.210.0"); `cli_version` is parametrized over them (ids = version).
- `daemon`: a fresh daemon (own port, database, token) per test; `start_daemon(**flags)`
  starts more, with extra flags (`lease_ttl=3` -> `--lease-ttl 3`).
- `storage`: where the daemons keep their data (env PULUMID_E2E_STORAGE: any of sqlite,
  postgres, sqlite+s3, postgres+s3; by default the two ends, sqlite and postgres+s3, to keep
  a cold CI run under an hour: the contract suite runs all four); each daemon gets a fresh
  database (a PostgreSQL database on the session server) and a fresh S3 prefix (session
  MinIO). SQLite runs with
  every CLI version; the others with the newest. `@pytest.mark.storages("sqlite", ...)`
  limits a heavy test to the stores it names.
- `cli`: the CLI of `cli_version`, pointed at `daemon` (token, per-test PULUMI_HOME, PATH
  with the CLI, the YAML host and the test provider); `make_cli(version, daemon)` builds
  one for another daemon or version.
- `project(name="p", items=3, **program)`: writes a YAML program of `items` chained
  pulumidtest:index:Item resources (tests/e2e/programs.py; `payload_size`, `fail_names`,
  `delay_ms`, `with_secret`, `extra_resources`) into a new directory and logs the CLI in;
  returns the directory. `make_project(cli, daemon, name, ...)` does it for another pair.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import (
    DEFAULT_CLI_VERSIONS,
    Daemon,
    PulumiCLI,
    build_provider,
    cli_binary,
    cli_environment,
    yaml_host_binary,
)
from tests.e2e.programs import write_yaml_program
from tests.minio import aws_env, minio_endpoint, s3_url
from tests.postgres import PostgresServer, postgres_server

__all__ = ["aws_env", "minio_endpoint", "postgres_server"]

CLI_VERSIONS = [
    v.strip()
    for v in os.environ.get("PULUMID_E2E_CLI_VERSIONS", DEFAULT_CLI_VERSIONS).split(",")
    if v.strip()
]

STORAGES = [
    s.strip()
    for s in os.environ.get("PULUMID_E2E_STORAGE", "sqlite,postgres+s3").split(",")
    if s.strip()
]

_DAEMONS = pytest.StashKey[list[Daemon]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "storages(*names): run only on these stores (heavy suites, to fit CI)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Other stores run with the newest CLI only; `storages` limits a test to those it names."""
    kept, dropped = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        storage = params.params.get("storage", "sqlite") if params else "sqlite"
        version = params.params.get("cli_version") if params else None
        limited = item.get_closest_marker("storages")
        if (limited and storage not in limited.args) or (
            storage != "sqlite" and version and version != CLI_VERSIONS[0]
        ):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(params=STORAGES)
def storage(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name not in ("sqlite", "postgres", "sqlite+s3", "postgres+s3"):
        pytest.fail(f"PULUMID_E2E_STORAGE: unknown storage {name!r}", pytrace=False)
    return name


@pytest.fixture
def storage_flags(storage: str, request: pytest.FixtureRequest) -> Callable[[], dict[str, str]]:
    """Flags that put a new daemon's data in a fresh database and S3 prefix of `storage`."""
    server: PostgresServer | None = None
    endpoint: str | None = None
    if storage.startswith("postgres"):
        server = request.getfixturevalue("postgres_server")
    if storage.endswith("+s3"):
        endpoint = request.getfixturevalue("minio_endpoint")

    def flags() -> dict[str, str]:
        made: dict[str, str] = {}
        if server is not None:
            made["database"] = server.create_database("e2e")
        if endpoint is not None:
            made["blob_store"] = s3_url(endpoint, "e2e-" + uuid.uuid4().hex[:16])
        return made

    return flags


@pytest.fixture(scope="session")
def cli_versions() -> list[str]:
    return list(CLI_VERSIONS)


@pytest.fixture(params=CLI_VERSIONS, ids=CLI_VERSIONS)
def cli_version(request: pytest.FixtureRequest) -> str:
    version: str = request.param
    return version


@pytest.fixture(scope="session")
def yaml_host_dir() -> Path:
    return yaml_host_binary().parent


@pytest.fixture(scope="session")
def provider_dir() -> Path:
    return build_provider()


@pytest.fixture
def start_daemon(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    storage_flags: Callable[[], dict[str, str]],
) -> Iterator[Callable[..., Daemon]]:
    """Factory: start_daemon(**flags) starts one more daemon; all are stopped at teardown."""
    started: list[Daemon] = []
    request.node.stash[_DAEMONS] = started

    def start(**flags: object) -> Daemon:
        daemon = Daemon(
            workdir=tmp_path / f"daemon{len(started)}", flags={**storage_flags(), **flags}
        )
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon()


@pytest.fixture
def make_cli(
    tmp_path: Path, yaml_host_dir: Path, provider_dir: Path
) -> Callable[[str, Daemon], PulumiCLI]:
    """Factory: make_cli(version, daemon) -> a CLI with its own PULUMI_HOME for that daemon."""
    count = 0

    def make(version: str, daemon: Daemon) -> PulumiCLI:
        nonlocal count
        count += 1
        binary = cli_binary(version)
        workdir = tmp_path / f"cli{count}"
        home = workdir / "pulumi-home"
        home.mkdir(parents=True)
        env = cli_environment(
            version, home, daemon.token, [binary.parent, yaml_host_dir, provider_dir]
        )
        return PulumiCLI(version=version, binary=binary, env=env, workdir=workdir)

    return make


@pytest.fixture
def cli(
    cli_version: str, daemon: Daemon, make_cli: Callable[[str, Daemon], PulumiCLI]
) -> PulumiCLI:
    return make_cli(cli_version, daemon)


ProjectFactory = Callable[..., Path]


@pytest.fixture
def make_project(tmp_path: Path, provider_dir: Path) -> Callable[..., Path]:
    """Factory: make_project(cli, daemon, name, **program) -> a logged-in project directory."""
    count = 0

    def make(
        cli: PulumiCLI, daemon: Daemon, name: str = "p", *, items: int = 3, **program: Any
    ) -> Path:
        nonlocal count
        count += 1
        directory = tmp_path / f"project{count}-{name}"
        write_yaml_program(
            directory, project=name, provider_dir=provider_dir, count=items, **program
        )
        cli.run("login", daemon.url, cwd=directory)
        return directory

    return make


@pytest.fixture
def project(cli: PulumiCLI, daemon: Daemon, make_project: Callable[..., Path]) -> ProjectFactory:
    """Factory: project(name="p", items=3, **program) -> a program directory for `cli`."""

    def make(name: str = "p", **program: Any) -> Path:
        return make_project(cli, daemon, name, **program)

    return make


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach the tail of every daemon log of the test to the report."""
    report = yield
    if report.failed:
        daemons: list[Daemon] = item.stash.get(_DAEMONS, [])
        for index, daemon in enumerate(daemons):
            report.sections.append(
                (f"pulumid log {index} ({daemon.log_path})", daemon.log_text(tail=3000))
            )
    return report
