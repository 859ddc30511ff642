"""Many stacks: `pulumi stack ls --all --json` against pulumid and other backends.

    GO=~/.cache/pulumid/go-backend/pulumi-backend
    python -m benchmarks.stacks --stacks 20000 --repeats 5 --out /tmp/stacks \\
        --peer "go=$GO -addr 127.0.0.1:{port} -db {dir}/db.sqlite -single-tenant-token {token}"

For each backend (pulumid first, then every --peer NAME=COMMAND as in benchmarks.run), a
fresh server gets --stacks empty stacks, created over HTTP (`POST /api/stacks/ORG/PROJECT`,
8 threads with a keep-alive connection each; ORG is the first organization of `GET
/api/user`, or the user's login without one), spread over 20 projects `p00`..`p19`. Then the
real CLI, logged in (untimed), runs `pulumi stack ls --all --json` --repeats times; each run
is timed as the CLI's wall-clock time, with the server's peak resident memory (VmHWM, reset
before the run) and CPU seconds during it, summed over the processes of its session. After
each run (untimed) its output must name every stack created, each once: the CLI pages
through `GET /api/user/stacks?continuationToken=...`, so this checks the paging.

Output: a Markdown table (median seconds, ratio to pulumid, median peak RSS and CPU, and the
server's RSS right after the stacks were created) on stdout and in OUT/results.md; every run
in OUT/measurements.csv; the servers' and the CLI's logs in OUT/logs/.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import http.client
import json
import shlex
import shutil
import statistics
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO,
    BenchmarkError,
    ServerUsage,
    cli_binary,
    resident_kib,
)
from benchmarks.run import (
    DEFAULT_CLI_VERSION,
    Backend,
    PeerBackend,
    PulumidBackend,
    Target,
    _parse_peer,
    cli_env,
    run_pulumi,
)

REFERENCE = "pulumid"
DEFAULT_STACKS = 20000
PROJECTS = 20
THREADS = 8
CSV_FIELDS = ("backend", "stacks", "repeat", "seconds", "peak_rss_mib", "cpu_seconds")
HEADERS = {"Accept": "application/vnd.pulumi+8", "Content-Type": "application/json"}


@dataclass(frozen=True)
class Listing:
    """One timed `pulumi stack ls --all --json`."""

    backend: str
    stacks: int
    repeat: int
    seconds: float
    peak_rss_mib: float | None
    cpu_seconds: float | None


@dataclass
class Result:
    """A backend's runs, and what creating its stacks took."""

    backend: str
    stacks: int
    create_seconds: float
    rss_after_create_mib: float | None
    listings: list[Listing] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Creating the stacks over HTTP


class Api:
    """Requests to a backend's API with a token; one keep-alive connection per thread."""

    def __init__(self, url: str, token: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 80
        self.headers = {**HEADERS, "Authorization": f"token {token}"}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded JSON answer (None if empty); a BenchmarkError unless it is a 2xx."""
        data = None if body is None else json.dumps(body).encode()
        conn = self._connection()
        try:
            conn.request(method, path, body=data, headers=self.headers)
            response = conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            # The server closed the idle keep-alive connection: once more on a new one (had
            # it created the stack after all, the 409 would fail loudly).
            conn.close()
            conn.request(method, path, body=data, headers=self.headers)
            response = conn.getresponse()
        payload = response.read()
        if not 200 <= response.status < 300:
            text = payload[:500].decode(errors="replace")
            raise BenchmarkError(f"{method} {path} answered {response.status}: {text}")
        return json.loads(payload) if payload.strip() else None

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections = []


def default_org(api: Api) -> str:
    """The first organization of the token's user, or the user's login without one."""
    user = api.request("GET", "/api/user")
    orgs = user.get("organizations") or []
    login = orgs[0].get("githubLogin") if orgs else user.get("githubLogin")
    if not login:
        raise BenchmarkError(f"GET /api/user names no organization nor login: {user}")
    return str(login)


def stack_names(count: int) -> list[tuple[str, str]]:
    """(project, stack) for COUNT stacks: unique stack names, round robin over the projects."""
    projects = min(PROJECTS, count)
    width = max(5, len(str(count - 1)))
    return [(f"p{i % projects:02d}", f"s{i:0{width}d}") for i in range(count)]


def create_stacks(api: Api, org: str, names: Sequence[tuple[str, str]], label: str) -> float:
    """Create every stack (a 409, the stack exists, fails like any other error); returns the
    wall-clock seconds it took."""

    def create(name: tuple[str, str]) -> None:
        project, stack = name
        path = f"/api/stacks/{urllib.parse.quote(org)}/{project}"
        api.request("POST", path, {"stackName": stack})

    step = max(1, len(names) // 10)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(create, name) for name in names]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            future.result()
            if done % step == 0 or done == len(names):
                rate = done / (time.perf_counter() - start)
                print(f"{label:>10}  {done}/{len(names)} stacks created ({rate:.0f}/s)", flush=True)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Listing them with the CLI


def check_listing(path: Path, names: Sequence[tuple[str, str]]) -> None:
    """The CLI's JSON lists every stack created, each once (not timed). The CLI shortens
    names (`org/project/stack`, `project/stack`); the stack names alone are unique."""
    listed = [str(entry["name"]).rsplit("/", 1)[-1] for entry in json.loads(path.read_text())]
    expected = {stack for _, stack in names}
    unique = set(listed)
    if len(listed) != len(names) or unique != expected:
        missing, extra = len(expected - unique), len(unique - expected)
        raise BenchmarkError(
            f"`stack ls --all` listed {len(listed)} stacks ({len(unique)} unique, {missing} "
            f"missing, {extra} unknown), expected {len(names)}; output in {path}"
        )


def measure_backend(backend: Backend, args: argparse.Namespace, cli: Path, out: Path) -> Result:
    """A fresh server with --stacks stacks, then --repeats timed `stack ls --all --json`."""
    workdir, logs = out / "work" / backend.name, out / "logs" / backend.name
    workdir.mkdir(parents=True)
    logs.mkdir(parents=True)
    names = stack_names(args.stacks)
    try:
        target = backend.open(workdir, logs)
        api = Api(target.url, target.env["PULUMI_ACCESS_TOKEN"])
        try:
            org = default_org(api)
            create_seconds = create_stacks(api, org, names, backend.name)
        finally:
            api.close()
        pids = backend.server_pids()
        rss = resident_kib(pids) / 1024 if pids else None
        result = Result(backend.name, args.stacks, create_seconds, rss)
        for repeat in range(1, args.repeats + 1):
            listing = list_stacks(backend, target, args, cli, workdir, logs, repeat, names)
            result.listings.append(listing)
    finally:
        backend.close()
    return result


def list_stacks(
    backend: Backend,
    target: Target,
    args: argparse.Namespace,
    cli: Path,
    workdir: Path,
    logs: Path,
    repeat: int,
    names: Sequence[tuple[str, str]],
) -> Listing:
    home, cwd = workdir / "home", workdir / "cwd"
    cwd.mkdir(exist_ok=True)
    env = cli_env(home, target)
    log, output = logs / "cli.log", workdir / f"stack-ls-{repeat}.json"

    def pulumi(*words: str, stdout: Path | None = None) -> float:
        return run_pulumi(
            cli, words, cwd=cwd, env=env, log=log, timeout=args.timeout, stdout=stdout
        )

    if repeat == 1:
        pulumi("login", target.url)
    usage = ServerUsage(backend.server_pids)
    usage.start()
    seconds = pulumi("stack", "ls", "--all", "--json", stdout=output)
    peak, cpu = usage.stop()
    check_listing(output, names)
    listing = Listing(backend.name, len(names), repeat, seconds, peak, cpu)
    print(
        f"{backend.name:>10}  repeat {repeat}  stack ls --all  {seconds:8.3f}s  "
        f"server {_number(peak, 1)} MiB peak, {_number(cpu, 3)}s CPU; "
        f"check: {len(names)} stacks listed, each once",
        flush=True,
    )
    return listing


# --------------------------------------------------------------------------------------------
# Reports


def _number(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _cell(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_csv(path: Path, results: Sequence[Result]) -> None:
    with path.open("w", newline="", encoding="utf-8") as sink:
        writer = csv.writer(sink)
        writer.writerow(CSV_FIELDS)
        for result in results:
            for m in result.listings:
                writer.writerow(
                    [
                        m.backend,
                        m.stacks,
                        m.repeat,
                        f"{m.seconds:.4f}",
                        _cell(m.peak_rss_mib, 1),
                        _cell(m.cpu_seconds, 3),
                    ]
                )


def markdown_table(results: Sequence[Result]) -> str:
    reference = next((r for r in results if r.backend == REFERENCE), None)
    base = _median([m.seconds for m in reference.listings]) if reference else None
    out = [
        "| Backend | Stacks | Runs | Median (s) | vs pulumid | Peak RSS (MiB) | CPU (s) "
        "| RSS after creating (MiB) | Creating (stacks/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        seconds = _median([m.seconds for m in r.listings])
        ratio = f"{seconds / base:.2f}" if seconds is not None and base else "—"
        out.append(
            f"| {r.backend} | {r.stacks} | {len(r.listings)} | {_number(seconds, 3)} | "
            f"{ratio} | {_number(_median([m.peak_rss_mib for m in r.listings]), 1)} | "
            f"{_number(_median([m.cpu_seconds for m in r.listings]), 3)} | "
            f"{_number(r.rss_after_create_mib, 1)} | {r.stacks / r.create_seconds:.0f} |"
        )
    return "\n".join(out) + "\n"


def markdown_report(results: Sequence[Result], args: argparse.Namespace) -> str:
    argv = ["python", "-m", "benchmarks.stacks", *sys.argv[1:]]
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# `pulumi stack ls --all` with many stacks",
        "",
        f"- Date: {date}",
        f"- pulumi CLI {args.cli_version}; pulumid from {REPO}",
        f"- Command: `{shlex.join(argv)}`",
        *[f"- Peer `{name}`: `{command}`" for name, command in args.peer],
        "",
        "Median wall-clock seconds of `pulumi stack ls --all --json`; `vs pulumid` is that "
        "divided by pulumid's median (below 1 is faster). Peak RSS and CPU: the server's "
        "highest resident memory and its user + system CPU seconds during a run (medians); "
        "RSS after creating: its resident memory once every stack existed, before any run. "
        "Every run listed each stack created exactly once.",
        "",
        markdown_table(results),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.stacks",
        description="Time `pulumi stack ls --all` against backends holding many stacks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2] if __doc__ else None,
    )
    p.add_argument("--stacks", type=int, default=DEFAULT_STACKS, help="stacks (20000)")
    p.add_argument("--repeats", type=int, default=5, help="timed listings per backend (5)")
    p.add_argument("--cli-version", default=DEFAULT_CLI_VERSION, help="pulumi CLI version")
    p.add_argument("--out", type=Path, default=Path("stacks-results"), help="output dir")
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
    p.add_argument("--timeout", type=float, default=600, help="seconds per CLI command (600)")
    p.add_argument("--keep", action="store_true", help="keep the servers' data in OUT/work")
    return p


@contextmanager
def _fresh(out: Path, keep: bool) -> Iterator[None]:
    """Empty OUT/work and OUT/logs; remove OUT/work afterwards unless KEEP."""
    for directory in (out / "work", out / "logs"):
        shutil.rmtree(directory, ignore_errors=True)
    try:
        yield
    finally:
        if not keep:
            shutil.rmtree(out / "work", ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    if args.stacks < 1 or args.repeats < 1:
        raise BenchmarkError("--stacks and --repeats must be at least 1")
    cli = cli_binary(args.cli_version)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    backends: list[Backend] = [PulumidBackend(args.pulumid_source.resolve())]
    backends += [PeerBackend(name, command) for name, command in args.peer]
    if len({b.name for b in backends}) != len(backends):
        raise BenchmarkError("backend names must be unique")
    results: list[Result] = []
    failures: list[str] = []
    with _fresh(out, args.keep):
        for backend in backends:
            try:
                results.append(measure_backend(backend, args, cli, out))
            except BenchmarkError as exc:
                failures.append(f"{backend.name}: {exc}")
                print(f"{backend.name:>10}  FAILED: {exc}", flush=True)
    if results:
        write_csv(out / "measurements.csv", results)
        report = markdown_report(results, args)
        (out / "results.md").write_text(report, encoding="utf-8")
        print()
        print(markdown_table(results))
        print(f"wrote {out / 'measurements.csv'}, {out / 'results.md'}")
    if failures:
        print(f"\n{len(failures)} backend(s) failed:", file=sys.stderr)
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
