"""A throwaway PostgreSQL server for tests: initdb in a temporary directory, started on a free
127.0.0.1 port, removed again on stop.

PostgreSQL refuses to run as root, so when the tests run as root (CI) every server command runs
as the unprivileged `postgres` user the Debian package creates; otherwise as the current user.
The temporary directory (data directory, unix socket directory, log) belongs to that user.

Authentication: `trust` on the unix socket (its directory is mode 0700 and owned by the server's
user, so only that user and root can reach it; the harness uses it for `createdb`), and
`scram-sha-256` with a generated password for TCP on 127.0.0.1, the way the daemon will connect
in production. So the DSN the tests get carries a real password and a test that forgot it fails.

A missing PostgreSQL fails loudly with the install command (never skips).
Durability is off (fsync, full_page_writes, synchronous_commit): a crashed test server is
thrown away anyway.

Use the session fixture `postgres_server` (re-exported by tests/pg/conftest.py; another test
directory can re-export it from its own conftest.py the same way), or `PostgresServer` directly.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.e2e.helpers import free_port

REPO = Path(__file__).resolve().parents[1]
INSTALL = "bash scripts/install-postgres.sh  (as root: apt-get install -y postgresql)"
SERVER_USER = "postgres"
SUPERUSER = "pulumid"
DATABASE = "pulumid"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
COMMAND_TIMEOUT = 120.0


class PostgresError(Exception):
    """A server command failed; the message carries its output and the server log."""


def find_bin_dir() -> Path | None:
    """The bin directory of the newest installed PostgreSQL (Debian layout), PATH as fallback."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    on_path = shutil.which("initdb")
    if on_path is not None:
        return Path(on_path).resolve().parent
    return None


def require_bin_dir() -> Path:
    """The PostgreSQL bin directory, or fail the test with the install command."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.fail(f"PostgreSQL server binaries (initdb) not found; install them: {INSTALL}")
    for tool in ("initdb", "pg_ctl", "postgres", "createdb"):
        if not os.access(bin_dir / tool, os.X_OK):
            pytest.fail(f"{bin_dir / tool} is missing or not executable; install: {INSTALL}")
    return bin_dir


class PostgresServer:
    """One PostgreSQL server in its own temporary directory. `start()`, then `dsn`/`url`."""

    def __init__(self, bin_dir: Path, database: str = DATABASE) -> None:
        self.bin_dir = bin_dir
        self.database = database
        self.user = SUPERUSER
        self.password = secrets.token_urlsafe(24)
        self.host = "127.0.0.1"
        self.port = 0
        self.root: Path | None = None
        self._as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise PostgresError(
                    f"running as root but there is no {SERVER_USER!r} user to run PostgreSQL as"
                    f" (the Debian package creates it): {INSTALL}"
                ) from None
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
            self._as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        else:
            self._uid, self._gid = os.geteuid(), os.getegid()

    # Paths inside the temporary directory.
    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "not started"
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.root is not None, "not started"
        return self.root / "socket"

    @property
    def log_file(self) -> Path:
        assert self.root is not None, "not started"
        return self.root / "postgres.log"

    @property
    def dsn(self) -> str:
        """A libpq keyword DSN (TCP, password authentication)."""
        return (
            f"host={self.host} port={self.port} dbname={self.database} user={self.user}"
            f" password={self.password} connect_timeout=10"
        )

    @property
    def url(self) -> str:
        """The same as a postgresql:// URL (the password is URL-safe)."""
        return self.url_of(self.database)

    def url_of(self, database: str) -> str:
        """A postgresql:// URL for DATABASE on this server (password authentication)."""
        return (
            f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"
            "?connect_timeout=10"
        )

    def create_database(self, prefix: str) -> str:
        """A new empty database named PREFIX_<random>; its postgresql:// URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url_of(name)

    def drop_database(self, url: str) -> None:
        """Drop the database URL names (from create_database), closing its sessions."""
        name = url.rsplit("/", 1)[1].split("?", 1)[0]
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _run(self, *args: str | Path, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run a server command as the server's user; raise PostgresError on failure."""
        assert self.root is not None
        command = [str(a) for a in args]
        env = dict(os.environ, LC_ALL="C", LANG="C", PGTZ="UTC")
        for name in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGSERVICE"):
            env.pop(name, None)
        try:
            done = subprocess.run(
                command,
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                **self._as_user,
            )
        except subprocess.TimeoutExpired as error:
            raise PostgresError(
                f"{command[0]} timed out after {timeout:.0f}s{self._log()}"
            ) from error
        if done.returncode != 0:
            raise PostgresError(
                f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
                f"{self._log()}"
            )
        output: str = done.stdout
        return output

    def _log(self) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""
        return f"\n--- server log ({self.log_file}) ---\n{text[-4000:]}"

    def _configure(self) -> None:
        extra = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.socket_dir}'",
            "fsync = off",
            "full_page_writes = off",
            "synchronous_commit = off",
            "max_connections = 100",
            "shared_buffers = 32MB",
            "log_min_messages = warning",
            "timezone = 'UTC'",
        ]
        conf = self.data_dir / "postgresql.auto.conf"
        with conf.open("a") as out:
            out.write("\n".join(extra) + "\n")

    def start(self, attempts: int = 3) -> PostgresServer:
        """initdb, start on a free 127.0.0.1 port (retrying another port if it was taken),
        create the database. Idempotent only in the sense that start twice is an error."""
        assert self.root is None, "already started"
        self.root = Path(tempfile.mkdtemp(prefix="pulumid-pg-"))
        try:
            os.chown(self.root, self._uid, self._gid)
            self.socket_dir.mkdir(mode=0o700)
            os.chown(self.socket_dir, self._uid, self._gid)
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.password + "\n")
            os.chown(pwfile, self._uid, self._gid)
            pwfile.chmod(0o600)
            try:
                self._run(
                    self.bin_dir / "initdb",
                    "--pgdata",
                    self.data_dir,
                    "--username",
                    self.user,
                    "--pwfile",
                    pwfile,
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                )
            finally:
                pwfile.unlink()
            for attempt in range(attempts):
                self.port = free_port()
                self._configure()
                try:
                    self._run(
                        self.bin_dir / "pg_ctl",
                        "start",
                        "--wait",
                        f"--timeout={int(START_TIMEOUT)}",
                        "--pgdata",
                        self.data_dir,
                        "--log",
                        self.log_file,
                        timeout=START_TIMEOUT + 10,
                    )
                    break
                except PostgresError:
                    if attempt + 1 == attempts or "could not bind" not in self._log():
                        raise
            self._run(
                self.bin_dir / "createdb",
                "--host",
                self.socket_dir,
                "--port",
                str(self.port),
                "--username",
                self.user,
                self.database,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def postmaster_pid(self) -> int | None:
        """The running postmaster's pid (from postmaster.pid), or None."""
        if self.root is None:
            return None
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Stop at once (`pg_ctl stop -m immediate`) and remove the temporary directory."""
        if self.root is None:
            return
        pid = self.postmaster_pid()
        try:
            if pid is not None:
                try:
                    self._run(
                        self.bin_dir / "pg_ctl",
                        "stop",
                        "--mode=immediate",
                        "--wait",
                        f"--timeout={int(STOP_TIMEOUT)}",
                        "--pgdata",
                        self.data_dir,
                        timeout=STOP_TIMEOUT + 10,
                    )
                except PostgresError:
                    # The postmaster we started, by pid: immediate shutdown failed, so kill it.
                    _kill_and_wait(pid, STOP_TIMEOUT)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_and_wait(pid: int, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def listening_addresses(port: int) -> Sequence[tuple[str, str]]:
    """(family, local address hex) of every TCP socket in LISTEN state on `port` (Linux)."""
    found: list[tuple[str, str]] = []
    for family in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{family}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":
                found.append((family, address))
    return found


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session (per conftest that re-exports this)."""
    try:
        server = PostgresServer(require_bin_dir())
        server.start()
    except PostgresError as error:
        pytest.fail(f"could not start PostgreSQL: {error}")
    try:
        yield server
    finally:
        server.stop()
