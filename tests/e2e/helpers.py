"""Plumbing for the CLI end-to-end tests: the daemon under test and the real `pulumi` CLI.

Everything here runs real processes: `twistd pulumid` on a loopback port, and the `pulumi`
binary built by `scripts/build-pulumi.sh`. Missing artifacts fail loudly (never skip).
"""

from __future__ import annotations

import json as jsonlib
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PULUMID_CACHE", "~/.cache/pulumid")).expanduser()
DEFAULT_CLI_VERSIONS = "3.259.0,3.210.0"
YAML_HOST_VERSION = os.environ.get("PULUMID_E2E_YAML_VERSION", "1.19.1")
TWISTD = Path(sys.executable).parent / "twistd"

ORG = "acme"
USER = "alice"

# Environment variables (exact names and prefixes) by which the CLI detects an AI coding
# agent; with one of them set and no token it tries an "agent sign-up" against the backend.
AGENT_MARKERS = frozenset({"AI_AGENT", "GEMINI_CLI", "REPL_ID", "GOOSE_PROVIDER"})
AGENT_MARKER_PREFIXES = ("CLAUDE", "CODEX", "CURSOR_", "OPENCODE", "COPILOT_", "GOOSE_")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

T = TypeVar("T")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.1,
    details: Callable[[], str] | None = None,
) -> T:
    """Poll `predicate` until it returns something truthy; fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{details()}" if details is not None else ""
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


def missing_artifact(path: Path, what: str, how: str) -> str | None:
    """Why the executable at PATH cannot be used, or None when it can."""
    if path.is_file() and os.access(path, os.X_OK):
        return None
    return (
        f"{what} not found at {path}; build it first with: {how}\n"
        f"(artifacts live under ${{PULUMID_CACHE:-~/.cache/pulumid}}, here {CACHE})"
    )


def cli_path(version: str) -> tuple[Path, str, str]:
    """(where the CLI of VERSION is cached, what it is, how to build it)."""
    return (
        CACHE / "cli" / version / "pulumi",
        f"pulumi CLI {version}",
        f"scripts/build-pulumi.sh cli {version}",
    )


def yaml_host_path() -> tuple[Path, str, str]:
    return (
        CACHE / "yaml" / YAML_HOST_VERSION / "pulumi-language-yaml",
        f"YAML language host {YAML_HOST_VERSION}",
        f"scripts/build-pulumi.sh yaml {YAML_HOST_VERSION}",
    )


PROVIDER = ("pulumi-resource-pulumidtest", "test provider pulumi-resource-pulumidtest")


def run_build_script(name: str, timeout: float) -> tuple[Path | None, str]:
    """Run scripts/NAME (each caches its result): (the last line it printed, or None, and
    what went wrong)."""
    script = REPO / "scripts" / name
    if not script.is_file():
        return None, f"{script} is missing"
    proc = subprocess.run(
        ["bash", str(script)], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        return None, (
            f"scripts/{name} failed ({proc.returncode}):\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return Path(lines[-1]), ""


def require_file(path: Path, what: str, how: str) -> Path:
    problem = missing_artifact(path, what, how)
    if problem:
        pytest.fail(problem, pytrace=False)
    return path


def cli_binary(version: str) -> Path:
    return require_file(*cli_path(version))


def yaml_host_binary() -> Path:
    return require_file(*yaml_host_path())


def build_provider() -> Path:
    """Run scripts/build-provider.sh (cached by the script) and return the plugin's directory."""
    directory, problem = run_build_script("build-provider.sh", 900)
    if directory is None:
        pytest.fail(problem, pytrace=False)
    require_file(directory / PROVIDER[0], PROVIDER[1], "scripts/build-provider.sh")
    return directory


# --------------------------------------------------------------------------------------------
# The daemon


def _flag_args(flags: Mapping[str, object]) -> list[str]:
    args: list[str] = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        option = "--" + name.replace("_", "-")
        if value is True:
            args.append(option)
        else:
            args.extend([option, str(value)])
    return args


@dataclass
class ApiResponse:
    status: int
    body: Any
    headers: Mapping[str, str]

    def __iter__(self) -> Iterator[Any]:  # so `status, body = daemon.api(...)` works
        return iter((self.status, self.body))


@dataclass
class Daemon:
    """One `twistd pulumid` process on a fixed loopback port and database."""

    workdir: Path
    flags: dict[str, object] = field(default_factory=dict)
    org: str = ORG
    user: str = USER
    token: str = field(default_factory=lambda: "pul-" + secrets.token_hex(20))
    master_key: str = field(default_factory=lambda: secrets.token_hex(32))
    port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    # Extra environment for the daemon, applied last at each start: PULUMID_* variables are
    # otherwise dropped (e.g. env={"PULUMID_TEST_FAULTS": "kill@commit:40"}).
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    # The CA that signed --tls-cert, trusted by api() (TLS daemons only).
    ca_file: Path | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.flags.get("tls_cert") or self.flags.get("acme_domains") else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def multi_user(self) -> bool:
        return self.flags.get("auth_mode", "single-tenant") != "single-tenant"

    @property
    def db_path(self) -> Path:
        return self.workdir / "pulumid.sqlite"

    @property
    def log_path(self) -> Path:
        return self.workdir / "pulumid.log"

    def command(self) -> list[str]:
        base: dict[str, object] = {
            "listen": f"tcp:{self.port}:interface=127.0.0.1",
            "management_listen": f"tcp:{self.management_port}:interface=127.0.0.1",
            # Text lines: the tests read access lines ("METHOD PATH HTTP/1.1" STATUS) back.
            "log_format": "text",
            "database": self.db_path,
            "token": None if self.multi_user else self.token,
            "master_key": self.master_key,
            "organization": self.org,
            "user": self.user,
            # Every checkpoint after an update's first is a delta: CLIs that do not journal
            # (3.210.0, or PULUMI_DISABLE_JOURNALING) exercise the delta path end to end.
            "delta_cutoff": 0,
        }
        base.update(self.flags)
        return [str(TWISTD), "-n", "--pidfile=", "pulumid", *_flag_args(base)]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PULUMID_")}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        )
        env.update(self.env)
        return env

    def log_text(self, tail: int = 20000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return "(no daemon log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0, wait: bool = True) -> Daemon:
        """Start the daemon; with WAIT, until its API answers (or fail the test)."""
        if self.running:
            raise RuntimeError("daemon already running")
        if not TWISTD.is_file():
            pytest.fail(f"{TWISTD} is missing (install twisted into the venv)", pytrace=False)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log.write(f"==== starting: {' '.join(self.command())}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if not wait:
            return self
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close_log()
                pytest.fail(
                    f"pulumid exited with {self.proc.returncode} during startup\n"
                    f"command: {self.command()}\nlog:\n{self.log_text()}",
                    pytrace=False,
                )
            try:
                response = self.api("GET", "/api/capabilities", timeout=2)
                # Multi-user daemons (no shared token) answer 401: up, and refusing strangers.
                if response.status == 200 or (self.multi_user and response.status == 401):
                    return self
                last = f"{response.status} {response.body!r}"
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.1)
        self.kill()
        pytest.fail(
            f"pulumid did not answer GET /api/capabilities with 200 within {timeout}s "
            f"(last: {last})\ncommand: {self.command()}\nlog:\n{self.log_text()}",
            pytrace=False,
        )

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; SIGKILL (and fail) if it does not exit in time."""
        if self.proc is None:
            return None
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"pulumid ignored SIGTERM for {timeout}s\nlog:\n{self.log_text()}")
        self.proc = None
        self._close_log()
        return proc.returncode

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
        self._close_log()

    def restart(self) -> Daemon:
        self.stop()
        return self.start()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def api(
        self,
        method: str,
        path: str,
        json: Any = None,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> ApiResponse:
        """One HTTP call with the API token; the body is decoded as JSON when it is JSON."""
        data = None if json is None else jsonlib.dumps(json).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"token {self.token if token is None else token}")
        request.add_header("Accept", "application/vnd.pulumi+8")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
                status, raw, hdrs = response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            status, raw, hdrs = exc.code, exc.read(), dict(exc.headers)
        body: Any
        try:
            body = jsonlib.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        return ApiResponse(status, body, hdrs)

    def api_ok(self, method: str, path: str, json: Any = None) -> Any:
        response = self.api(method, path, json)
        if not 200 <= response.status < 300:
            pytest.fail(f"{method} {path} -> {response.status} {response.body!r}")
        return response.body


# --------------------------------------------------------------------------------------------
# The CLI


def cli_environment(
    version: str, home: Path, token: str, path_dirs: Sequence[Path]
) -> dict[str, str]:
    """The environment every CLI call runs with: no inherited PULUMI_*, no agent markers."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PULUMI_")
        and k not in AGENT_MARKERS
        and not k.startswith(AGENT_MARKER_PREFIXES)
    }
    env.update(
        PULUMI_HOME=str(home),
        PULUMI_SKIP_UPDATE_CHECK="true",
        PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION="true",
        PULUMI_ACCESS_TOKEN=token,
        NO_COLOR="1",
        PATH=os.pathsep.join([*(str(d) for d in path_dirs), env.get("PATH", "")]),
    )
    return env


@dataclass
class Background:
    """A CLI command running in the background, output going to a file."""

    args: tuple[str, ...]
    proc: subprocess.Popen[bytes]
    output_path: Path

    def output(self) -> str:
        return strip_ansi(self.output_path.read_text(errors="replace"))

    def kill(self) -> None:
        """SIGKILL the CLI and everything it started (language host, providers)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(
                f"pulumi {' '.join(self.args)} still running after {timeout}s:\n{self.output()}"
            )


@dataclass
class PulumiCLI:
    version: str
    binary: Path
    env: dict[str, str]
    workdir: Path

    def _env(self, env_extra: Mapping[str, str | None] | None) -> dict[str, str]:
        env = dict(self.env)
        for name, value in (env_extra or {}).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def run(
        self,
        *args: str,
        cwd: Path,
        check: bool = True,
        env_extra: Mapping[str, str | None] | None = None,
        timeout: float = 300,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `pulumi ARGS`; output is captured (ANSI stripped). check=True fails on rc != 0."""
        command = [str(self.binary), *args]
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=self._env(env_extra),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(
                f"pulumi {' '.join(args)} (CLI {self.version}) timed out after {timeout}s\n"
                f"stdout:\n{stdout}\nstderr:\n{stderr}"
            )
        result = subprocess.CompletedProcess(
            command, proc.returncode, strip_ansi(stdout), strip_ansi(stderr)
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"pulumi {' '.join(args)} (CLI {self.version}, cwd {cwd}) exited "
                f"{result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def fail(
        self,
        *args: str,
        cwd: Path,
        env_extra: Mapping[str, str | None] | None = None,
        timeout: float = 300,
    ) -> str:
        """Run a command that must fail; returns stdout + stderr."""
        result = self.run(*args, cwd=cwd, check=False, env_extra=env_extra, timeout=timeout)
        if result.returncode == 0:
            pytest.fail(
                f"pulumi {' '.join(args)} (CLI {self.version}) unexpectedly succeeded\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result.stdout + result.stderr

    def json(self, *args: str, cwd: Path, **kwargs: Any) -> Any:
        """Run a command with --json and decode its stdout."""
        result = self.run(*args, "--json", cwd=cwd, **kwargs)
        try:
            return jsonlib.loads(result.stdout)
        except ValueError:
            pytest.fail(
                f"pulumi {' '.join(args)} --json printed no JSON:\n{result.stdout}\n"
                f"stderr:\n{result.stderr}"
            )

    def popen(
        self,
        *args: str,
        cwd: Path,
        env_extra: Mapping[str, str | None] | None = None,
    ) -> Background:
        """Start `pulumi ARGS` in its own process group; output goes to a file."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        out = self.workdir / f"bg-{time.monotonic_ns()}.log"
        with out.open("wb") as sink:
            proc = subprocess.Popen(
                [str(self.binary), *args],
                cwd=cwd,
                env=self._env(env_extra),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return Background(tuple(args), proc, out)

    def has_command(self, *words: str, cwd: Path) -> bool:
        """Whether `pulumi WORDS --help` names that exact command (unknown words fall back)."""
        result = self.run(*words, "--help", cwd=cwd, check=False)
        usage = result.stdout + result.stderr
        return result.returncode == 0 and f"pulumi {' '.join(words)}" in usage


# --------------------------------------------------------------------------------------------
# Reading CLI output


def stack_names(listing: Sequence[Mapping[str, Any]]) -> set[str]:
    """Bare stack names from `pulumi stack ls --json` (names may be org/project-qualified)."""
    return {str(entry["name"]).split("/")[-1] for entry in listing}


def resources(deployment: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The resources of an exported deployment (`{"version", "deployment": {...}}`)."""
    inner = deployment.get("deployment") or {}
    return list(inner.get("resources") or [])


def urns(deployment: Mapping[str, Any]) -> list[str]:
    return [str(r["urn"]) for r in resources(deployment)]


def urn_named(deployment: Mapping[str, Any], name: str) -> str:
    for urn in urns(deployment):
        if urn.endswith("::" + name):
            return urn
    pytest.fail(f"no resource named {name!r} in {urns(deployment)}")


def stack_path(org: str, project: str, stack: str) -> str:
    return f"/api/stacks/{org}/{project}/{stack}"


def wait_for_update_running(
    daemon: Daemon, stack: str, run: Background, project: str = "p"
) -> None:
    """Wait until the daemon reports an update in progress on ORG/PROJECT/STACK."""

    def running() -> bool:
        if run.proc.poll() is not None:
            pytest.fail(f"background update exited {run.proc.returncode}:\n{run.output()}")
        body = daemon.api("GET", stack_path(daemon.org, project, stack)).body
        return isinstance(body, dict) and bool(body.get("currentOperation"))

    wait_until(running, 60, f"an update in progress on {project}/{stack}", 0.2, run.output)
