"""Shared plumbing for the benchmarks: artifacts, a clean environment, server processes.

Artifacts (the `pulumi` CLI, the YAML language host, the test provider, MinIO) are the ones
the end-to-end tests use, cached under ${PULUMID_CACHE:-~/.cache/pulumid}. A missing one is
an error (`BenchmarkError`) that names the command that builds it; nothing is skipped.
PostgreSQL is the installed one (scripts/install-postgres.sh), run by the tests' harness
(tests/postgres.py) with its durability settings restored.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tests.e2e.helpers import (
    AGENT_MARKER_PREFIXES,
    AGENT_MARKERS,
    CACHE,
    PROVIDER,
    REPO,
    cli_path,
    free_port,
    missing_artifact,
    run_build_script,
    yaml_host_path,
)
from tests.postgres import INSTALL as POSTGRES_INSTALL
from tests.postgres import PostgresError, PostgresServer, find_bin_dir

__all__ = [
    "CACHE",
    "REPO",
    "BenchmarkError",
    "BenchmarkPostgres",
    "PostgresError",
    "Server",
    "ServerUsage",
    "build_minio",
    "build_provider",
    "clean_environment",
    "cli_binary",
    "cpu_seconds",
    "free_port",
    "http_ready",
    "minio_server",
    "new_token",
    "peak_rss_kib",
    "port_ready",
    "postgres_server",
    "pulumid_server",
    "reset_peak",
    "resident_kib",
    "rss_kib",
    "server_pids",
    "session_pids",
    "yaml_host_dir",
]

TWISTD = Path(sys.executable).parent / "twistd"
MINIO_USER = "pulumidbench"
MINIO_PASSWORD = "pulumidbench-secret"


class BenchmarkError(RuntimeError):
    """A benchmark cannot go on: a missing artifact, a server that did not start, a failed
    CLI command. The message says what happened and, where it can, how to fix it."""


# --------------------------------------------------------------------------------------------
# Artifacts


def _require_executable(path: Path, what: str, how: str) -> Path:
    problem = missing_artifact(path, what, how)
    if problem:
        raise BenchmarkError(problem)
    return path


def cli_binary(version: str) -> Path:
    return _require_executable(*cli_path(version))


def yaml_host_dir() -> Path:
    """The directory of the YAML language host (for the program's `plugins: languages:`)."""
    return _require_executable(*yaml_host_path()).parent


def _build(name: str, timeout: float) -> Path:
    path, problem = run_build_script(name, timeout)
    if path is None:
        raise BenchmarkError(problem)
    return path


def build_provider() -> Path:
    """The directory holding `pulumi-resource-pulumidtest` (scripts/build-provider.sh)."""
    directory = _build("build-provider.sh", 900)
    _require_executable(directory / PROVIDER[0], PROVIDER[1], "scripts/build-provider.sh")
    return directory


def build_minio() -> Path:
    """The MinIO server binary (scripts/build-minio.sh; a cold build takes minutes)."""
    return _require_executable(
        _build("build-minio.sh", 1800), "MinIO server", "scripts/build-minio.sh"
    )


# --------------------------------------------------------------------------------------------
# Environment


def clean_environment() -> dict[str, str]:
    """This process's environment without PULUMI_*, PULUMID_*, AWS_* and the variables by
    which the CLI detects an AI coding agent (it would then try an agent sign-up)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PULUMI_", "PULUMID_", "AWS_"))
        and k not in AGENT_MARKERS
        and not k.startswith(AGENT_MARKER_PREFIXES)
    }


def new_token() -> str:
    return "pul-" + secrets.token_hex(20)


# --------------------------------------------------------------------------------------------
# Server processes


def port_ready(port: int) -> Callable[[], bool]:
    """Readiness: something accepts TCP connections on 127.0.0.1:PORT."""

    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    return ready


def http_ready(url: str, headers: Mapping[str, str] | None = None) -> Callable[[], bool]:
    """Readiness: GET URL answers 200."""

    def ready() -> bool:
        request = urllib.request.Request(url, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.HTTPError):
            return False

    return ready


@dataclass
class Server:
    """A server process in its own session (so stopping it stops its children), with its
    output in `log_path`, started and waited for with `start()`."""

    name: str
    command: Sequence[str]
    workdir: Path
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=clean_environment)
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchmarkError(f"{self.name} is not running")
        return self.proc.pid

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except FileNotFoundError:
            return "(no log)"

    def start(self, timeout: float = 60.0) -> Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            list(self.command),
            cwd=self.workdir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise BenchmarkError(
                    f"{self.name} exited with {code} during startup\n"
                    f"command: {list(self.command)}\nlog:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise BenchmarkError(
                    f"{self.name} was not ready within {timeout:.0f}s\n"
                    f"command: {list(self.command)}\nlog:\n{self.log_tail()}"
                )
            time.sleep(0.1)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group; SIGKILL it if it has not exited within `timeout`."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()
            # Children that outlived the leader (a shell's server, say).
            _signal_group(proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pulumid_server(
    workdir: Path,
    *,
    port: int,
    token: str,
    database: Path | str | None = None,
    source: Path = REPO,
    org: str = "acme",
    user: str = "alice",
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    master_key: str | None = None,
    name: str = "pulumid",
) -> Server:
    """`twistd -n pulumid` on 127.0.0.1:PORT; the database (a SQLite path or a postgresql://
    URL) defaults to WORKDIR/pulumid.sqlite (a fresh one if the file does not exist); the log
    is WORKDIR/NAME.log. SOURCE is the source tree whose `pulumid` package runs (put first on
    PYTHONPATH; default: this one). ENV is added to the clean environment (the S3 blob store
    takes its credentials from there); MASTER_KEY defaults to a new random one."""
    if not TWISTD.is_file():
        raise BenchmarkError(f"{TWISTD} is missing (install pulumid into this venv)")
    command = [
        str(TWISTD),
        "-n",
        "--pidfile=",
        "pulumid",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--database",
        str(database or workdir / "pulumid.sqlite"),
        "--token",
        token,
        "--master-key",
        master_key or secrets.token_hex(32),
        "--organization",
        org,
        "--user",
        user,
        *extra_args,
    ]
    environment = clean_environment()
    # Several servers run at once: no management listener each on 9090 (older sources that
    # do not know the variable ignore it).
    environment["PULUMID_MANAGEMENT_LISTEN"] = "none"
    environment.update(env or {})
    environment["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(source), environment.get("PYTHONPATH", "")) if p
    )
    ready = http_ready(
        f"http://127.0.0.1:{port}/api/capabilities", {"Authorization": f"token {token}"}
    )
    return Server(name, command, workdir, ready, environment)


# --------------------------------------------------------------------------------------------
# What a server's processes use (from /proc: Linux only)


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (the state) on, or None if PID is gone. Field 2, the
    command name, is in parentheses and may itself hold spaces and parentheses: split after
    the last ')'."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 1 :].split()


def session_pids(sessions: Iterable[int]) -> list[int]:
    """Every process whose session id (field 6 of /proc/PID/stat) is one of SESSIONS."""
    wanted = set(sessions)
    if not wanted:
        return []
    found: list[int] = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None and int(fields[3]) in wanted:
                found.append(int(name))
    return found


def server_pids(*servers: Server | None) -> list[int]:
    """The processes of running SERVERS: each started a session of its own, so its pid is the
    session id, shared by whatever it started (a shell's server, that server's children)."""
    return session_pids(s.proc.pid for s in servers if s is not None and s.proc is not None)


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of PID in KiB, from /proc/PID/status."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def reset_peak(pids: Iterable[int]) -> None:
    """Reset each process's VmHWM to its current RSS (needs the same user or root)."""
    for pid in pids:
        # A process may have exited since it was found.
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def _summed(pids: Iterable[int], field: int) -> int:
    """A field of rss_kib summed over the processes that still exist."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += rss_kib(pid)[field]
    return total


def resident_kib(pids: Iterable[int]) -> int:
    """The sum of the processes' VmRSS (resident memory now), in KiB."""
    return _summed(pids, 0)


def peak_rss_kib(pids: Iterable[int]) -> int:
    """The sum of the processes' VmHWM, in KiB (each one's peak, not the peak of the sum)."""
    return _summed(pids, 1)


def _cpu_by_pid(pids: Iterable[int]) -> dict[int, float]:
    """User + system seconds of each process (all its threads) that is still there."""
    tick = os.sysconf("SC_CLK_TCK")
    times: dict[int, float] = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # utime and stime are fields 14 and 15.
            times[pid] = (int(fields[11]) + int(fields[12])) / tick
    return times


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system seconds the processes have used so far, all their threads."""
    return sum(_cpu_by_pid(pids).values())


class ServerUsage:
    """The peak RSS and the CPU time of a server's processes between `start` and `stop`.
    PIDS is asked again each time: processes may come and go in between."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self._cpu: dict[int, float] = {}

    def start(self) -> None:
        pids = self.pids()
        reset_peak(pids)
        self._cpu = _cpu_by_pid(pids)

    def stop(self) -> tuple[float | None, float | None]:
        """(peak RSS in MiB, CPU seconds), or (None, None) without processes to measure."""
        pids = self.pids()
        if not pids:
            return None, None
        # Per process, so one that exited in between does not make the difference negative.
        now = _cpu_by_pid(pids)
        cpu = sum(seconds - self._cpu.get(pid, 0.0) for pid, seconds in now.items())
        return peak_rss_kib(pids) / 1024, max(cpu, 0.0)


def minio_server(
    binary: Path, workdir: Path, *, data: Path, port: int, console_port: int
) -> Server:
    """MinIO on 127.0.0.1:PORT storing its objects in DATA (root user MINIO_USER); its log
    is WORKDIR/minio.log."""
    env = clean_environment()
    env.update(
        MINIO_ROOT_USER=MINIO_USER,
        MINIO_ROOT_PASSWORD=MINIO_PASSWORD,
        MINIO_BROWSER="off",
        MINIO_UPDATE="off",
    )
    command = [
        str(binary),
        "server",
        str(data),
        "--quiet",
        "--address",
        f"127.0.0.1:{port}",
        "--console-address",
        f"127.0.0.1:{console_port}",
    ]
    ready = http_ready(f"http://127.0.0.1:{port}/minio/health/live")
    return Server("minio", command, workdir, ready, env)


class BenchmarkPostgres(PostgresServer):
    """The tests' throwaway PostgreSQL server, but durable: the test harness turns fsync and
    synchronous commits off, while the SQLite backend it is compared with fsyncs every commit
    (the default since issue 13). Shared buffers are PostgreSQL's default (the harness uses
    32 MB); the rest (loopback TCP, scram-sha-256 with a generated password) is unchanged."""

    SETTINGS = (
        "fsync = on",
        "full_page_writes = on",
        "synchronous_commit = on",
        "shared_buffers = 128MB",
    )

    def _configure(self) -> None:
        super()._configure()
        # Appended after the harness's lines, so these win.
        with (self.data_dir / "postgresql.auto.conf").open("a") as out:
            out.write("\n".join(self.SETTINGS) + "\n")


def postgres_server() -> BenchmarkPostgres:
    """A BenchmarkPostgres on the newest installed PostgreSQL (not started yet)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise BenchmarkError(
            f"PostgreSQL server binaries (initdb) not found; install: {POSTGRES_INSTALL}"
        )
    for tool in ("initdb", "pg_ctl", "postgres", "createdb"):
        if not os.access(bin_dir / tool, os.X_OK):
            raise BenchmarkError(f"{bin_dir / tool} is missing; install: {POSTGRES_INSTALL}")
    try:
        return BenchmarkPostgres(bin_dir)
    except PostgresError as exc:
        raise BenchmarkError(str(exc)) from exc


def positive_ints(text: str) -> list[int]:
    """An argparse type: a comma-separated list of positive integers."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected positive integers")
    return values


def chosen_names(text: str, allowed: Sequence[str], hint: str = "") -> list[str]:
    """A comma-separated choice from `allowed`, in order, without repeats."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {unknown}; choose from {', '.join(allowed)}{hint}"
        )
    return list(dict.fromkeys(names))
