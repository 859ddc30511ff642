"""The real `pulumi` CLI against several state backends, side by side, on one machine.

    python -m benchmarks.run --sizes 10,200 --backends pulumid,file,s3,floor --repeats 3 \\
        --out /tmp/bench

Workload (the same for every backend): a YAML program of N independent
`pulumidtest:index:Item` resources (the test provider, tests/provider), each with a 16 KB
`payload` output, and these operations in order, each timed as the CLI's wall-clock time:

    create    up --yes --skip-preview            (N new resources)
    noop-1    up --yes --skip-preview            (nothing changes)
    noop-2    up --yes --skip-preview            (nothing changes)
    add-2     up --yes --skip-preview            (the program has 2 more items)
    export    stack export --file ...
    destroy   destroy --yes --skip-preview

Backends:

    pulumid   a fresh `twistd pulumid` (new database) per run, logged in with a token
    pulumid-pg     pulumid with its metadata in PostgreSQL (one durable server per harness
              run, a fresh database per backend run) and its blobs inline (opt-in)
    pulumid-pg-s3  the same with its blobs in MinIO (a fresh prefix per backend run; opt-in)
    pulumid-3nodes three pulumid-pg-s3 nodes on one database and prefix behind HAProxy,
              round robin per request (tests/cluster/harness.py; opt-in)
    file      the CLI's own file:// backend (a fresh directory per run)
    s3        the CLI's s3:// backend against a local MinIO (a fresh bucket per run)
    floor     file:// with PULUMI_SKIP_CHECKPOINTS=true: no intermediate checkpoints at all
    NAME      any other server given with --peer NAME=COMMAND: COMMAND is a shell command with
              {port}, {token} and {dir} (a fresh, empty directory) placeholders that starts
              the server on 127.0.0.1:{port}; the CLI logs in at http://127.0.0.1:{port}
              with PULUMI_ACCESS_TOKEN={token}

Beside each wall-clock time, the backend's server is measured during the operation (from
/proc, so Linux only): its peak resident memory (VmHWM, reset before each operation) in MiB
and the CPU seconds (user + system, all threads) it used. Both are summed over every process
in the server's session (a peer's shell and what it starts; every node of pulumid-3nodes,
not HAProxy). file, s3 (MinIO is the CLI's backend, not a server of ours) and floor have
none: their columns stay empty.

Every backend run gets a fresh PULUMI_HOME, PULUMI_SKIP_UPDATE_CHECK=true,
PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION=true and no AI-agent variables. Logging in and
`stack init` are not timed. Each CLI command may take --timeout seconds; by default 1800 or
60 + 0.2 per resource, whichever is more. Sizes of 3,000 and 10,000 are opt-in; the CLI's
file and s3 backends write the whole state at every step, so they run only up to
--quadratic-max resources (1,000). Output in --out: measurements.csv (every measurement:
seconds, peak_rss_mib, cpu_seconds), results.md (medians with ratios against pulumid and the
floor, peak RSS and CPU), benchmarks.png, meta.json, and logs/ (every command's output).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
import pytest
from psycopg import sql

from benchmarks.common import (
    MINIO_PASSWORD,
    MINIO_USER,
    REPO,
    BenchmarkError,
    BenchmarkPostgres,
    PostgresError,
    Server,
    ServerUsage,
    build_minio,
    build_provider,
    chosen_names,
    clean_environment,
    cli_binary,
    free_port,
    minio_server,
    new_token,
    port_ready,
    positive_ints,
    postgres_server,
    pulumid_server,
    server_pids,
    yaml_host_dir,
)
from benchmarks.report import (
    Measurement,
    markdown_tables,
    medians,
    read_csv,
    read_meta,
    write_csv,
    write_docs,
    write_meta,
    write_reports,
)
from tests.cluster.harness import HAProxy, haproxy_binary
from tests.e2e.helpers import YAML_HOST_VERSION
from tests.e2e.programs import write_yaml_program

OPERATIONS = ("create", "noop-1", "noop-2", "add-2", "export", "destroy")
BUILTIN_BACKENDS = (
    "pulumid",
    "pulumid-nosync",
    "pulumid-batch5",
    "pulumid-pg",
    "pulumid-pg-s3",
    "pulumid-3nodes",
    "file",
    "s3",
    "floor",
)
# What runs unless --backends says otherwise. Opt-in diagnostics: pulumid-nosync (no fsync
# per commit: what durability against power loss costs) and pulumid-batch5, where the CLI
# flushes journal batches every 5 ms instead of its default 50 ms: it shows how much of
# pulumid's time is the CLI waiting for its own batching. Opt-in too: pulumid-pg,
# pulumid-pg-s3 and pulumid-3nodes, which need PostgreSQL (and HAProxy) installed and compare
# pulumid's storage layouts with each other rather than pulumid with the CLI's own backends.
DEFAULT_BACKENDS = ("pulumid", "file", "s3", "floor")
POSTGRES_BACKENDS = ("pulumid-pg", "pulumid-pg-s3", "pulumid-3nodes")
MINIO_BACKENDS = ("s3", "pulumid-pg-s3", "pulumid-3nodes")
CLUSTER_NODES = 3
DEFAULT_SIZES = (10, 200, 600)
# The CLI's own backends that rewrite the whole state at every step: hours at 10,000.
QUADRATIC = ("file", "s3")
QUADRATIC_MAX = 1000
DEFAULT_CLI_VERSION = "3.259.0"
PAYLOAD_SIZE = 16384
ADDED = 2
PROJECT = "bench"
STACK = "dev"
PASSPHRASE = "pulumid-benchmark"
BLOB_BUCKET = "pulumid-blobs"
WORKLOAD = (
    "N independent pulumidtest:index:Item resources with a 16 KB payload each (YAML program); "
    "create, no-op up, no-op up, add 2 resources, stack export, destroy"
)


# --------------------------------------------------------------------------------------------
# Backends


@dataclass
class Target:
    """Where the CLI logs in, and the environment it needs for that."""

    url: str
    env: dict[str, str] = field(default_factory=dict)


class Backend:
    """One kind of state backend. `open` prepares a fresh one for a single workload run in
    WORKDIR (logs in LOGS); `close` tears it down again."""

    name: str = ""

    def open(self, workdir: Path, logs: Path) -> Target:
        raise NotImplementedError

    def close(self) -> None:
        """Stop whatever `open` started (a no-op by default)."""

    def server_pids(self) -> list[int]:
        """The processes of the backend's own server(s), measured per operation (none by
        default: the CLI's file and s3 backends have no server of ours)."""
        return []


class PulumidBackend(Backend):
    """A fresh pulumid per run: SQLite in the run's directory by default; with POSTGRES, a
    fresh database on that server; with MINIO, blobs under a fresh prefix of its bucket."""

    name = "pulumid"

    def __init__(
        self,
        source: Path,
        name: str = "pulumid",
        extra_args: Sequence[str] = (),
        cli_env: Mapping[str, str] | None = None,
        postgres: Postgres | None = None,
        minio: Minio | None = None,
    ) -> None:
        self.source = source
        self.name = name
        self.extra_args = tuple(extra_args)
        self.cli_env = dict(cli_env or {})
        self.postgres = postgres
        self.minio = minio
        self.server: Server | None = None
        self.database: str | None = None

    def open(self, workdir: Path, logs: Path) -> Target:
        port, token = free_port(), new_token()
        database: Path | str = workdir / "pulumid.sqlite"
        args = list(self.extra_args)
        env: dict[str, str] = {}
        if self.postgres is not None:
            self.database = self.postgres.create_database()
            database = self.postgres.url(self.database)
        if self.minio is not None:
            prefix = f"{self.name}-{uuid.uuid4().hex[:16]}"
            args += ["--blob-store", self.minio.blob_store_url(prefix)]
            env.update(self.minio.credentials())
        self.server = pulumid_server(
            logs,
            port=port,
            token=token,
            database=database,
            source=self.source,
            extra_args=args,
            env=env,
        ).start()
        return Target(f"http://127.0.0.1:{port}", {"PULUMI_ACCESS_TOKEN": token, **self.cli_env})

    def server_pids(self) -> list[int]:
        return server_pids(self.server)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        # Untimed: the next run starts from an equally empty server.
        if self.postgres is not None and self.database is not None:
            self.postgres.drop_database(self.database)
            self.database = None


class ClusterBackend(Backend):
    """NODES pulumid nodes per run, each started as PulumidBackend starts one, sharing a fresh
    database, a fresh blob prefix, the token and the master key, with HAProxy in front (round
    robin per request, health checks every 250 ms): what a multi-node deployment costs one
    CLI, against pulumid-pg-s3."""

    def __init__(
        self, source: Path, postgres: Postgres, minio: Minio, nodes: int, name: str
    ) -> None:
        self.source = source
        self.postgres = postgres
        self.minio = minio
        self.nodes = nodes
        self.name = name
        self.servers: list[Server] = []
        self.proxy: HAProxy | None = None
        self.database: str | None = None

    def open(self, workdir: Path, logs: Path) -> Target:
        token, master_key = new_token(), secrets.token_hex(32)
        self.database = self.postgres.create_database()
        blob_store = self.minio.blob_store_url(f"{self.name}-{uuid.uuid4().hex[:16]}")
        ports = [free_port() for _ in range(self.nodes)]
        # One after the other: the first node creates the schema, the others find it.
        for index, port in enumerate(ports):
            server = pulumid_server(
                logs,
                port=port,
                token=token,
                database=self.postgres.url(self.database),
                source=self.source,
                extra_args=["--blob-store", blob_store],
                env=self.minio.credentials(),
                master_key=master_key,
                name=f"pulumid-node{index}",
            )
            self.servers.append(server.start())
        backends = [(f"node{index}", port) for index, port in enumerate(ports)]
        try:
            self.proxy = HAProxy(haproxy_binary(), logs, backends, token).start()
        except pytest.fail.Exception as exc:  # the harness is pytest's; this is not
            raise BenchmarkError(str(exc)) from None
        return Target(self.proxy.url, {"PULUMI_ACCESS_TOKEN": token})

    def server_pids(self) -> list[int]:
        # The nodes, not HAProxy: what pulumid costs, summed over the deployment.
        return server_pids(*self.servers)

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        for server in self.servers:
            server.stop()
        self.servers = []
        if self.database is not None:
            self.postgres.drop_database(self.database)
            self.database = None


class FileBackend(Backend):
    def __init__(self, name: str, *, skip_checkpoints: bool) -> None:
        self.name = name
        self.skip_checkpoints = skip_checkpoints

    def open(self, workdir: Path, logs: Path) -> Target:
        state = workdir / "state"
        state.mkdir(parents=True)
        env = {"PULUMI_CONFIG_PASSPHRASE": PASSPHRASE}
        if self.skip_checkpoints:
            env["PULUMI_SKIP_CHECKPOINTS"] = "true"
        return Target(f"file://{state}", env)


class Minio:
    """One MinIO server for the whole run (started on first use), a bucket per backend run."""

    def __init__(self, workdir: Path, logs: Path) -> None:
        self.workdir = workdir
        self.logs = logs
        self.server: Server | None = None
        self.port = 0
        self.binary: Path | None = None
        self._blob_bucket = False

    def start(self) -> None:
        if self.server is not None:
            return
        self.binary = build_minio()
        self.port = free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        server = minio_server(
            self.binary,
            self.logs,
            data=self.workdir / "data",
            port=self.port,
            console_port=free_port(),
        )
        self.server = server.start(timeout=120)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def create_bucket(self, name: str) -> None:
        try:
            import boto3
        except ImportError as exc:
            raise BenchmarkError("the s3 backend needs boto3 (pip install boto3)") from exc
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=MINIO_USER,
            aws_secret_access_key=MINIO_PASSWORD,
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=name)

    def blob_store_url(self, prefix: str) -> str:
        """pulumid's --blob-store: PREFIX in the one bucket for pulumid's blobs."""
        self.start()
        if not self._blob_bucket:
            self.create_bucket(BLOB_BUCKET)
            self._blob_bucket = True
        return (
            f"s3://{BLOB_BUCKET}/{prefix}?endpoint={self.endpoint}&region=us-east-1&path_style=true"
        )

    @staticmethod
    def credentials() -> dict[str, str]:
        """For boto3's default chain, and nothing from this machine's AWS setup."""
        return {
            "AWS_ACCESS_KEY_ID": MINIO_USER,
            "AWS_SECRET_ACCESS_KEY": MINIO_PASSWORD,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


class Postgres:
    """One PostgreSQL server for the whole run (started on first use), a database per backend
    run, dropped after it."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.server: BenchmarkPostgres | None = None
        self.version: str | None = None
        # As the running server reports them, for the run's metadata.
        self.settings: dict[str, str] = {}

    def start(self) -> None:
        if self.server is not None:
            return
        server = postgres_server()
        try:
            server.start()
        except PostgresError as exc:
            raise BenchmarkError(f"could not start PostgreSQL: {exc}") from exc
        self.server = server
        self.version = str(self._execute(sql.SQL("SHOW server_version"), fetch=True))
        for name in ("fsync", "synchronous_commit", "full_page_writes", "shared_buffers"):
            query = sql.SQL("SELECT current_setting({})").format(sql.Literal(name))
            self.settings[name] = str(self._execute(query, fetch=True))

    def _execute(self, statement: sql.SQL | sql.Composed, *, fetch: bool = False) -> object:
        assert self.server is not None
        try:
            # Autocommit: CREATE and DROP DATABASE cannot run inside a transaction.
            with psycopg.connect(self.server.dsn, autocommit=True) as conn:
                cursor = conn.execute(statement)
                row = cursor.fetchone() if fetch else None
        except psycopg.Error as exc:
            raise BenchmarkError(f"PostgreSQL: {statement.as_string()}: {exc}") from exc
        return row[0] if row else None

    def create_database(self) -> str:
        self.start()
        name = f"bench_{uuid.uuid4().hex[:16]}"
        self._execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        if self.server is not None:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            self._execute(drop.format(sql.Identifier(name)))

    def url(self, database: str) -> str:
        assert self.server is not None
        s = self.server
        return f"postgresql://{s.user}:{s.password}@{s.host}:{s.port}/{database}"

    def stop(self) -> None:
        if self.server is not None:
            # Its directory goes with it; keep the log with the run's others.
            self.logs.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copyfile(self.server.log_file, self.logs / "postgres.log")
            self.server.stop()
            self.server = None


class S3Backend(Backend):
    name = "s3"

    def __init__(self, minio: Minio) -> None:
        self.minio = minio

    def open(self, workdir: Path, logs: Path) -> Target:
        self.minio.start()
        bucket = f"bench-{uuid.uuid4().hex[:16]}"
        self.minio.create_bucket(bucket)
        url = f"s3://{bucket}?endpoint={self.minio.endpoint}&use_path_style=true&region=us-east-1"
        env = {
            "AWS_ACCESS_KEY_ID": MINIO_USER,
            "AWS_SECRET_ACCESS_KEY": MINIO_PASSWORD,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "PULUMI_CONFIG_PASSPHRASE": PASSPHRASE,
        }
        return Target(url, env)


class PeerBackend(Backend):
    """Any other backend server, started by a shell command per run."""

    def __init__(self, name: str, command: str) -> None:
        self.name = name
        self.command = command
        self.server: Server | None = None

    def open(self, workdir: Path, logs: Path) -> Target:
        port, token = free_port(), new_token()
        data = workdir / "peer-data"
        data.mkdir(parents=True)
        command = (
            self.command.replace("{port}", str(port))
            .replace("{token}", token)
            .replace("{dir}", shlex.quote(str(data)))
        )
        server = Server(self.name, ["bash", "-c", command], logs, port_ready(port))
        self.server = server.start(timeout=120)
        return Target(f"http://127.0.0.1:{port}", {"PULUMI_ACCESS_TOKEN": token})

    def server_pids(self) -> list[int]:
        return server_pids(self.server)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


# --------------------------------------------------------------------------------------------
# The workload


@dataclass
class Tools:
    cli: Path
    cli_version: str
    yaml_host_dir: Path
    provider_dir: Path
    timeout: float


def cli_env(home: Path, target: Target) -> dict[str, str]:
    env = clean_environment()
    env.update(
        PULUMI_HOME=str(home),
        PULUMI_SKIP_UPDATE_CHECK="true",
        PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION="true",
        NO_COLOR="1",
    )
    env.update(target.env)
    return env


def run_cli(
    tools: Tools, args: Sequence[str], *, cwd: Path, env: Mapping[str, str], log: Path
) -> float:
    """Run `pulumi ARGS` with its output appended to LOG; return its wall-clock seconds.
    A non-zero exit is a BenchmarkError with the end of the output."""
    return run_pulumi(tools.cli, args, cwd=cwd, env=env, log=log, timeout=tools.timeout)


def run_pulumi(
    cli: Path,
    args: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log: Path,
    timeout: float,
    stdout: Path | None = None,
) -> float:
    """`run_cli` with the CLI binary and timeout given; with STDOUT, the command's standard
    output goes to that file (for output to parse) and only its errors to LOG."""
    with log.open("ab") as sink, _output(stdout, sink) as out:
        sink.write(f"$ pulumi {shlex.join(args)}\n".encode())
        sink.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(
            [str(cli), *args],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=sink,
            start_new_session=True,
        )
        try:
            proc.wait(timeout)
        except BaseException as exc:
            # Timed out or interrupted: stop the CLI with its language host and providers.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise BenchmarkError(
                    f"pulumi {shlex.join(args)} timed out after {timeout:.0f}s (output in {log})"
                ) from exc
            raise
        seconds = time.perf_counter() - start
        sink.write(f"# exit {proc.returncode} after {seconds:.3f}s\n\n".encode())
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise BenchmarkError(
            f"pulumi {shlex.join(args)} exited {proc.returncode} (log {log}):\n{tail}"
        )
    return seconds


def _output(path: Path | None, log: IO[bytes]) -> contextlib.AbstractContextManager[IO[bytes]]:
    """PATH opened for writing, or LOG itself (left open) without one."""
    return path.open("wb") if path is not None else contextlib.nullcontext(log)


def write_program(tools: Tools, directory: Path, items: int) -> None:
    # `extra_resources` items are independent (no parent, no dependsOn): a flat program that
    # the engine deploys in parallel. No chained items and no secret.
    write_yaml_program(
        directory,
        project=PROJECT,
        provider_dir=tools.provider_dir,
        count=0,
        extra_resources=items,
        payload_size=PAYLOAD_SIZE,
        with_secret=False,
        yaml_host_dir=tools.yaml_host_dir,
    )


def run_workload(
    tools: Tools,
    backend: Backend,
    size: int,
    repeat: int,
    workdir: Path,
    logs: Path,
    report: Callable[[Measurement], None],
) -> None:
    """One backend run: a fresh backend, PULUMI_HOME and project; every operation timed."""
    workdir.mkdir(parents=True)
    logs.mkdir(parents=True, exist_ok=True)
    project = workdir / "project"
    write_program(tools, project, size)
    try:
        target = backend.open(workdir, logs)
        env = cli_env(workdir / "home", target)
        log = logs / "cli.log"

        def pulumi(*args: str) -> float:
            return run_cli(tools, args, cwd=project, env=env, log=log)

        pulumi("login", target.url)
        pulumi("stack", "init", STACK)
        up = ("up", "--yes", "--skip-preview", "--stack", STACK)
        export = workdir / "export.json"
        usage = ServerUsage(backend.server_pids)
        for operation in OPERATIONS:
            if operation == "add-2":
                write_program(tools, project, size + ADDED)
            usage.start()
            if operation == "export":
                seconds = pulumi("stack", "export", "--stack", STACK, "--file", str(export))
            elif operation == "destroy":
                seconds = pulumi("destroy", "--yes", "--skip-preview", "--stack", STACK)
            else:
                seconds = pulumi(*up)
            peak, cpu = usage.stop()
            report(Measurement(backend.name, size, operation, repeat, seconds, peak, cpu))
            if operation == "export":
                _check_export(export, size + ADDED)
    finally:
        backend.close()


def _check_export(path: Path, items: int) -> None:
    """The exported state holds the stack, the provider and every item: the workload did what
    it claims (not timed)."""
    document = json.loads(path.read_text(encoding="utf-8"))
    resources = (document.get("deployment") or {}).get("resources") or []
    found = sum(1 for r in resources if str(r.get("type")) == "pulumidtest:index:Item")
    if found != items:
        raise BenchmarkError(f"the exported state has {found} items, expected {items}")


# --------------------------------------------------------------------------------------------
# The command line


def _parse_backends(text: str) -> list[str]:
    return chosen_names(text, BUILTIN_BACKENDS, " (add other servers with --peer NAME=COMMAND)")


def runs_at(name: str, size: int, args: argparse.Namespace) -> bool:
    """Backends whose time grows with the square of N (file and s3 write the whole state at
    every step) stop at --quadratic-max; every other backend runs at every size."""
    return name not in QUADRATIC or size <= args.quadratic_max


def _parse_peer(text: str) -> tuple[str, str]:
    name, sep, command = text.partition("=")
    name = name.strip()
    if not sep or not name or not command.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=COMMAND, got {text!r}")
    if name in BUILTIN_BACKENDS or not name.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"bad peer name {name!r}")
    if "{port}" not in command:
        raise argparse.ArgumentTypeError("the peer command needs a {port} placeholder")
    return name, command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Run the pulumi CLI workload against several state backends.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2] if __doc__ else None,
    )
    p.add_argument(
        "--sizes",
        type=positive_ints,
        default=list(DEFAULT_SIZES),
        help="resource counts, comma-separated (default: 10,200,600; 3000 and 10000 are the "
        "large sizes, opt-in)",
    )
    p.add_argument(
        "--quadratic-max",
        type=int,
        default=QUADRATIC_MAX,
        metavar="N",
        help=f"largest size at which {' and '.join(QUADRATIC)} run: they write the whole state "
        f"at every step (default: {QUADRATIC_MAX})",
    )
    p.add_argument(
        "--backends",
        type=_parse_backends,
        default=list(DEFAULT_BACKENDS),
        help="built-in backends, comma-separated (default: pulumid,file,s3,floor)",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per backend and size (3)")
    p.add_argument("--cli-version", default=DEFAULT_CLI_VERSION, help="pulumi CLI version")
    p.add_argument("--out", type=Path, default=Path("benchmark-results"), help="output dir")
    p.add_argument(
        "--peer",
        type=_parse_peer,
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="another backend server started by a shell command ({port}, {token}, {dir})",
    )
    p.add_argument(
        "--pulumid-source",
        type=Path,
        default=REPO,
        metavar="DIR",
        help="the source tree whose pulumid package runs (default: this checkout)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per CLI command (default: 1800, or 60 + 0.2 per resource if more)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep each run's state and PULUMI_HOME in OUT/work"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rebuild results.md and the chart from OUT/measurements.csv",
    )
    p.add_argument(
        "--write-docs",
        action="store_true",
        help="also write the results section of docs/benchmarks.md and docs/benchmarks.png",
    )
    return p


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
    }


def _pulumid_version(source: Path) -> str:
    """The git commit of the pulumid source tree (`-dirty` with local changes), if any."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(source), "describe", "--always", "--dirty", "--abbrev=10"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return str(source)
    described = proc.stdout.strip()
    return f"git {described}" if proc.returncode == 0 and described else str(source)


def _haproxy_version() -> str:
    """HAProxy's version ("2.6.12-1+deb12u4"); a BenchmarkError when it is missing."""
    try:
        binary = haproxy_binary()
    except pytest.fail.Exception as exc:
        raise BenchmarkError(str(exc)) from None
    proc = subprocess.run(
        [str(binary), "-v"], capture_output=True, text=True, timeout=30, check=False
    )
    words = proc.stdout.split()
    return words[2] if len(words) > 2 and words[:2] == ["HAProxy", "version"] else "?"


def _meta(
    args: argparse.Namespace,
    backends: Sequence[str],
    minio: Path | None,
    postgres: Postgres,
    haproxy: str | None,
) -> dict[str, Any]:
    argv = ["python", "-m", "benchmarks.run", *sys.argv[1:]]
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "versions": {
            "cli": args.cli_version,
            "yaml": YAML_HOST_VERSION,
            "python": platform.python_version(),
            "pulumid": _pulumid_version(args.pulumid_source.resolve()),
            "minio": minio.parent.name if minio is not None else None,
            "postgresql": postgres.version,
            "haproxy": haproxy,
        },
        "postgresql_settings": [f"{k} = {v}" for k, v in postgres.settings.items()],
        "workload": WORKLOAD,
        "command": shlex.join(argv),
        "sizes": list(args.sizes),
        "repeats": args.repeats,
        "backends": list(backends),
        "peers": dict(args.peer),
    }


def _make_backends(
    names: Sequence[str],
    peers: Sequence[tuple[str, str]],
    minio: Minio,
    postgres: Postgres,
    source: Path,
) -> list[Backend]:
    made: list[Backend] = []
    for name in names:
        if name == "pulumid":
            made.append(PulumidBackend(source))
        elif name == "pulumid-nosync":
            made.append(PulumidBackend(source, name, ["--no-sync-commits"]))
        elif name == "pulumid-batch5":
            made.append(
                PulumidBackend(source, name, cli_env={"PULUMI_JOURNALING_BATCH_PERIOD": "5"})
            )
        elif name == "pulumid-pg":
            made.append(PulumidBackend(source, name, postgres=postgres))
        elif name == "pulumid-pg-s3":
            made.append(PulumidBackend(source, name, postgres=postgres, minio=minio))
        elif name == "pulumid-3nodes":
            made.append(ClusterBackend(source, postgres, minio, CLUSTER_NODES, name))
        elif name == "file":
            made.append(FileBackend("file", skip_checkpoints=False))
        elif name == "floor":
            made.append(FileBackend("floor", skip_checkpoints=True))
        elif name == "s3":
            made.append(S3Backend(minio))
    made += [PeerBackend(name, command) for name, command in peers]
    if len({b.name for b in made}) != len(made):
        raise BenchmarkError("backend names must be unique")
    return made


def cli_timeout(given: float | None, size: int) -> float:
    """--timeout if given; else 1800 s, or more for large sizes (a create of 600 resources
    takes about 10 s against pulumid, but the CLI's own backends grow with the square)."""
    if given is not None:
        return given
    return max(1800.0, 60.0 + 0.2 * (size + ADDED))


def run(args: argparse.Namespace) -> int:
    out: Path = args.out.resolve()
    if args.report_only:
        stored = read_csv(out / "measurements.csv")
        stored_meta = read_meta(out / "meta.json")
        write_reports(out, stored, stored_meta)
        if args.write_docs:
            write_docs(out)
        print(markdown_tables(medians(stored, stored_meta.get("backends") or ())))
        return 0
    if args.repeats < 1:
        raise BenchmarkError("--repeats must be at least 1")
    tools = Tools(
        cli=cli_binary(args.cli_version),
        cli_version=args.cli_version,
        yaml_host_dir=yaml_host_dir(),
        provider_dir=build_provider(),
        timeout=0.0,  # set per size below (cli_timeout)
    )
    out.mkdir(parents=True, exist_ok=True)
    work, logs = out / "work", out / "logs"
    if work.exists():
        shutil.rmtree(work)
    if logs.exists():
        shutil.rmtree(logs)
    minio = Minio(work / "minio", logs / "minio")
    postgres = Postgres(logs / "postgres")
    backends = _make_backends(
        args.backends, args.peer, minio, postgres, args.pulumid_source.resolve()
    )
    measurements: list[Measurement] = []
    failures: list[str] = []

    def record(m: Measurement) -> None:
        measurements.append(m)
        server = ""
        if m.peak_rss_mib is not None and m.cpu_seconds is not None:
            server = f"  server {m.peak_rss_mib:7.1f} MiB peak, {m.cpu_seconds:7.3f}s CPU"
        print(
            f"{m.backend:>14}  N={m.size:<5} repeat {m.repeat}  {m.operation:<8} "
            f"{m.seconds:9.3f}s{server}",
            flush=True,
        )

    try:
        # Fail early (and build MinIO) rather than after the first backends ran.
        if any(name in MINIO_BACKENDS for name in args.backends):
            minio.start()
        if any(name in POSTGRES_BACKENDS for name in args.backends):
            postgres.start()
        haproxy = _haproxy_version() if "pulumid-3nodes" in args.backends else None
        meta = _meta(args, [b.name for b in backends], minio.binary, postgres, haproxy)
        write_meta(out / "meta.json", meta)
        print(
            f"pulumi CLI {args.cli_version}, sizes {args.sizes}, backends "
            f"{[b.name for b in backends]}, {args.repeats} repeat(s); output in {out}",
            flush=True,
        )
        for size in args.sizes:
            sized = dataclasses.replace(tools, timeout=cli_timeout(args.timeout, size))
            at_size = [b for b in backends if runs_at(b.name, size, args)]
            for repeat in range(1, args.repeats + 1):
                # Rotate the order per repeat so no backend always runs first or last.
                shift = (repeat - 1) % len(at_size)
                for backend in at_size[shift:] + at_size[:shift]:
                    run_dir = work / f"{backend.name}-{size}-{repeat}"
                    try:
                        run_workload(
                            sized,
                            backend,
                            size,
                            repeat,
                            run_dir,
                            logs / f"{backend.name}-{size}-{repeat}",
                            record,
                        )
                    except BenchmarkError as exc:
                        failures.append(f"{backend.name} N={size} repeat {repeat}: {exc}")
                        print(f"{backend.name:>14}  N={size:<5} FAILED: {exc}", flush=True)
                    finally:
                        if not args.keep:
                            shutil.rmtree(run_dir, ignore_errors=True)
                    # Keep partial results on disk as the run goes.
                    write_csv(out / "measurements.csv", measurements)
    finally:
        minio.stop()
        postgres.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if measurements:
        csv_path, md_path, png_path = write_reports(out, measurements, meta)
        print()
        print(markdown_tables(medians(measurements, meta["backends"])))
        print(f"wrote {csv_path}, {md_path}, {png_path}")
        if args.write_docs:
            write_docs(out)
            print("wrote docs/benchmarks.md (results section) and docs/benchmarks.png")
    if failures:
        print(f"\n{len(failures)} backend run(s) failed:", file=sys.stderr)
        for failure in failures:
            print(f"- {failure}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
