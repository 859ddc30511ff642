"""Several `twistd pulumid` nodes on one PostgreSQL database and one S3 prefix, behind one
HAProxy, all on loopback. Used by tests/cluster and benchmarks/cluster.py.

    cluster = Cluster(workdir, pg_url, s3_url, size=3).start()
    cli = make_cli(version, cluster.front)      # the CLI talks to HAProxy only
    ...
    cluster.nodes[1].kill()                     # SIGKILL one node
    cluster.proxy.wait_status("node1", "DOWN")  # its health checks failed
    cluster.stop()

Every node is a `tests.e2e.helpers.Daemon` with the same token and master key. `front` is a
Daemon that is never started: its url, token and `api()` go through HAProxy, so the helpers
written for one daemon (the e2e `make_cli`/`make_project` fixtures, `wait_for_update_running`,
`api_ok`) work on the cluster unchanged. With one node there is no HAProxy and `front` is that
node itself.

HAProxy (Debian's 2.6; `bash scripts/install-haproxy.sh`) runs in the foreground as a child
process with a config written to the workdir: HTTP mode, `balance roundrobin` per request (no
`prefer-last-server`, so consecutive requests on one kept-alive client connection go to
different nodes), health checks on GET /api/capabilities every 250 ms, a retry on another node
for a request whose node refused the connection, and for a request the CLI itself may replay
(GET, and the update calls it retries: journal entries, checkpoints, events, lease renewals,
complete, cancel, secrets), also when the node closed the connection without an answer.
Requests the CLI never retries (create/start update, create stack, import) are not replayed
blindly: they fail with HAProxy's 502, as they would against one node that died.

Each finished request is one line of HAProxy's log (`proxy.log_entries()`); each node's twistd
log has its own access lines (`requests_by_node`), so tests can see who served what.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from tests.e2e.helpers import Daemon, PulumiCLI, cli_binary, cli_environment, free_port
from tests.e2e.programs import write_yaml_program

HAPROXY_INSTALL = "bash scripts/install-haproxy.sh  (as root: apt-get install -y haproxy)"

# The update calls the CLI re-sends itself on a transport error or a 5xx (all-methods retry
# policy), so the server must treat a replay as a no-op: safe for HAProxy to replay too.
REPLAYABLE_SUFFIXES = (
    "/journalentries",
    "/checkpoint",
    "/checkpointverbatim",
    "/checkpointdelta",
    "/events/batch",
    "/renew_lease",
    "/complete",
    "/cancel",
    "/encrypt",
    "/decrypt",
    "/batch-encrypt",
    "/batch-decrypt",
)

# Each request HAProxy finished, one line (see HAProxy.config's log-format).
_PROXY_LINE = re.compile(
    r"^pulumid-front node=(?P<node>\S+) status=(?P<status>-?\d+) retries=(?P<retries>\+?\d+)"
    r" term=(?P<term>\S+) ms=(?P<ms>-?\d+) (?P<method>[A-Z]+) (?P<path>\S+)$"
)
# A node's access line (twisted.web's combined log format in the twistd log).
_ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) ')
# /api/stacks/ORG/PROJECT/STACK/update/ID[/...]: the calls that belong to one update.
_UPDATE_PATH = re.compile(
    r"^/api/stacks/[^/]+/[^/]+/(?P<stack>[^/]+)/(?:update|preview|refresh|destroy)/"
    r"(?P<update>[0-9A-Za-z-]+)(?P<rest>/[^?]*)?"
)


def haproxy_binary() -> Path:
    """Debian's haproxy, or fail the test with the install command."""
    # /usr/sbin is not on every PATH (a non-root shell's, say).
    for candidate in (shutil.which("haproxy"), "/usr/sbin/haproxy"):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    pytest.fail(f"haproxy not found; install it: {HAPROXY_INSTALL}", pytrace=False)


def update_of(path: str) -> tuple[str, str, str] | None:
    """(stack, update id, the rest of the path) when PATH is a call of one update."""
    match = _UPDATE_PATH.match(path)
    if match is None:
        return None
    return match["stack"], match["update"], match["rest"] or ""


# --------------------------------------------------------------------------------------------
# HAProxy


@dataclass(frozen=True)
class ProxyLogEntry:
    """One request as HAProxy finished it."""

    node: str  # the server that answered last, or <NOSRV>
    status: int  # -1 when the client went away first
    retries: int
    redispatched: bool  # a retry went to another node than the first attempt
    termination: str  # HAProxy's two-letter termination state, "--" when normal
    ms: int
    method: str
    path: str


@dataclass
class HAProxy:
    """One haproxy in the foreground in front of BACKENDS ((name, port) on 127.0.0.1)."""

    binary: Path
    workdir: Path
    backends: Sequence[tuple[str, int]]
    token: str
    port: int = field(default_factory=free_port)
    stats_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "haproxy.cfg"

    @property
    def log_path(self) -> Path:
        return self.workdir / "haproxy.log"

    def config(self) -> str:
        replayable = " ".join(REPLAYABLE_SUFFIXES)
        servers = "\n".join(f"    server {name} 127.0.0.1:{port}" for name, port in self.backends)
        return f"""\
global
    log stdout format raw local0 info
    maxconn 4096
    # retry-on keeps a copy of each request and cannot replay one larger than a buffer.
    tune.bufsize 262144

defaults
    mode http
    log global
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    timeout http-request 30s
    timeout http-keep-alive 30s
    timeout check 2s
    # A refused connection is retried on another node (redispatch on every retry).
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response

frontend pulumid-front
    bind 127.0.0.1:{self.port}
    log-format "pulumid-front node=%s status=%ST retries=%rc term=%ts ms=%Ta %HM %HP"
    default_backend pulumid-nodes

backend pulumid-nodes
    balance roundrobin
    option httpchk
    http-check send meth GET uri /api/capabilities hdr Authorization "token {self.token}"
    http-check expect status 200
    # Two failed checks 250 ms apart take a dead node out; one good one brings it back.
    default-server check inter 250ms fastinter 250ms downinter 1s fall 2 rise 1
    # Replaying a request whose answer was lost is only safe where the CLI would replay it.
    acl replayable method GET HEAD
    acl replayable path_end {replayable}
    http-request disable-l7-retry unless replayable
{servers}

frontend stats
    bind 127.0.0.1:{self.stats_port}
    no log
    stats enable
    stats uri /stats
"""

    def start(self, timeout: float = 20.0) -> HAProxy:
        if self.proc is not None:
            raise RuntimeError("haproxy already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The config holds the token (health checks send it).
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.config())
        check = subprocess.run(
            [str(self.binary), "-c", "-q", "-f", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            pytest.fail(
                f"haproxy refused its config {self.config_path}:\n{check.stdout}{check.stderr}",
                pytrace=False,
            )
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(self.binary), "-db", "-f", str(self.config_path)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                pytest.fail(f"haproxy exited with {code} at startup:\n{self.log_text()}")
            try:
                states = self.server_states()
                if states and all(s.startswith("UP") for s in states.values()):
                    return self
            except OSError:
                states = {}
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"haproxy's nodes were not all UP within {timeout:.0f}s: {states}\n"
                    f"{self.log_text()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self, tail: int = 8000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return "(no haproxy log)"

    def stats(self) -> list[dict[str, str]]:
        """HAProxy's CSV statistics, one dict per frontend, backend and server."""
        url = f"http://127.0.0.1:{self.stats_port}/stats;csv"
        with urllib.request.urlopen(url, timeout=5) as response:
            text: str = response.read().decode()
        lines = [line for line in text.splitlines() if line.strip()]
        header = lines[0].lstrip("# ").split(",")
        return [dict(zip(header, line.split(","), strict=False)) for line in lines[1:]]

    def server_states(self) -> dict[str, str]:
        """Each node's state as the health checks see it: UP, DOWN, "UP 1/2", ..."""
        return {
            row["svname"]: row["status"]
            for row in self.stats()
            if row.get("pxname") == "pulumid-nodes" and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    def wait_status(self, node: str, prefix: str, timeout: float = 15.0) -> float:
        """Wait until NODE's state starts with PREFIX; the seconds that took."""
        started = time.monotonic()
        state = "?"
        while time.monotonic() - started < timeout:
            state = self.server_states().get(node, "?")
            if state.startswith(prefix):
                return time.monotonic() - started
            time.sleep(0.05)
        pytest.fail(f"haproxy still has {node} {state}, not {prefix}, after {timeout:.0f}s")

    def log_entries(self) -> list[ProxyLogEntry]:
        entries: list[ProxyLogEntry] = []
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return entries
        for line in text.splitlines():
            match = _PROXY_LINE.match(line.strip())
            if match is None:
                continue
            retries = match["retries"]
            entries.append(
                ProxyLogEntry(
                    node=match["node"],
                    status=int(match["status"]),
                    retries=int(retries.lstrip("+")),
                    redispatched=retries.startswith("+"),
                    termination=match["term"],
                    ms=int(match["ms"]),
                    method=match["method"],
                    path=match["path"],
                )
            )
        return entries


# --------------------------------------------------------------------------------------------
# The cluster


@dataclass
class Cluster:
    """N pulumid nodes sharing DATABASE (postgresql://) and BLOB_STORE (s3://), with one
    HAProxy in front when N > 1. The S3 credentials come from this process's AWS_* variables
    (Daemon passes them on)."""

    workdir: Path
    database: str
    blob_store: str
    size: int = 3
    # Extra daemon flags for every node (e.g. {"lease_ttl": 60}).
    flags: dict[str, object] = field(default_factory=dict)
    nodes: list[Daemon] = field(default_factory=list)
    proxy: HAProxy | None = None
    front: Daemon = field(init=False)

    def __post_init__(self) -> None:
        first = Daemon(workdir=self.workdir / "node0")
        self.nodes = [first] + [
            Daemon(
                workdir=self.workdir / f"node{i}",
                token=first.token,
                master_key=first.master_key,
            )
            for i in range(1, self.size)
        ]
        for node in self.nodes:
            node.flags = {"database": self.database, "blob_store": self.blob_store, **self.flags}
        if self.size > 1:
            self.proxy = HAProxy(
                haproxy_binary(),
                self.workdir / "haproxy",
                [(self.node_name(i), node.port) for i, node in enumerate(self.nodes)],
                first.token,
            )
            # Never started: url, token and api() of the cluster as a client sees it.
            self.front = Daemon(
                workdir=self.workdir / "front",
                token=first.token,
                master_key=first.master_key,
                port=self.proxy.port,
            )
        else:
            self.front = first

    @staticmethod
    def node_name(index: int) -> str:
        return f"node{index}"

    @property
    def url(self) -> str:
        return self.front.url

    @property
    def token(self) -> str:
        return self.front.token

    def start(self) -> Cluster:
        try:
            # The first node creates the schema; the others find it there.
            for node in self.nodes:
                node.start()
            if self.proxy is not None:
                self.proxy.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for node in self.nodes:
            if node.running:
                node.stop()
            else:
                node.kill()  # reaps a killed node's process, closes its log

    def requests_by_node(self) -> dict[str, Counter[tuple[str, str]]]:
        """For each node (node0, ...), how many calls of each (stack, update id) its access
        log shows."""
        counts: dict[str, Counter[tuple[str, str]]] = {}
        for index, node in enumerate(self.nodes):
            counter: Counter[tuple[str, str]] = Counter()
            for match in _ACCESS_LINE.finditer(node.log_text(tail=1 << 30)):
                owner = update_of(match["path"])
                if owner is not None:
                    counter[owner[0], owner[1]] += 1
            counts[self.node_name(index)] = counter
        return counts


# --------------------------------------------------------------------------------------------
# The CLI, outside pytest fixtures (the benchmark)


def cluster_cli(
    version: str, cluster: Cluster, workdir: Path, yaml_host_dir: Path, provider_dir: Path
) -> PulumiCLI:
    """A CLI with its own PULUMI_HOME under WORKDIR for CLUSTER (the e2e `make_cli`)."""
    binary = cli_binary(version)
    home = workdir / "pulumi-home"
    home.mkdir(parents=True, exist_ok=True)
    env = cli_environment(
        version, home, cluster.token, [binary.parent, yaml_host_dir, provider_dir]
    )
    return PulumiCLI(version=version, binary=binary, env=env, workdir=workdir)


def cluster_project(
    cli: PulumiCLI,
    cluster: Cluster,
    directory: Path,
    provider_dir: Path,
    *,
    items: int,
    **program: Any,
) -> Path:
    """A YAML program of ITEMS chained test resources in DIRECTORY, the CLI logged in."""
    write_yaml_program(directory, project="p", provider_dir=provider_dir, count=items, **program)
    cli.run("login", cluster.url, cwd=directory)
    return directory
