"""Crash points: the daemon SIGKILLed at many points of 300-resource updates.

One stack per CLI version goes through a few phases (create 300 items, replace them all,
delete them, ...). During each phase's `up` the daemon dies several times: just before or
just after the N-th SQLite COMMIT since its last start (PULUMID_TEST_FAULTS
`kill@commit:N` / `kill@committed:N`, so mid-request and between commit and answer), or
SIGKILLed by the test once its export shows the phase k items along. It is restarted at
once on the same database, so the CLI's own retries (1 s, 2 s, 4 s) carry the update on;
at "outage" points it stays down until the CLI gives up (or, after OUTAGE seconds, the
CLI is SIGKILLed). After each phase the CLI converges: `pulumi cancel` if the stack is
still locked (it must be after an outage), `pulumi refresh`, `pulumi up` (which must find
nothing to do when the killed `up` reported success), and the final state must hold
exactly the test provider's "cloud": every id its Create logged and its Delete did not,
under its name, once (the provider gives each Create an id of its own, so a re-created
resource shows as a second live id).

Outages only come once no Create can be in flight (deleting, or every item of the phase
acknowledged): a CLI that dies mid-Create leaks that resource whatever the backend does.

CLI 3.259.0 journals; 3.210.0 does not and, with the Daemon's delta_cutoff=0, sends delta
checkpoints. Every point is written to `crash-points.json` in the test's tmp dir and
summarised on stdout, one line each.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import Background, Daemon, PulumiCLI, stack_path
from tests.e2e.programs import ITEM_TYPE, write_yaml_program

pytestmark = pytest.mark.e2e

ITEMS = 300
UP = ("up", "--yes", "--skip-preview")
STACK = "crash"
OUTAGE = 25.0  # longest a daemon stays down at an outage point
_CHANGES = re.compile(
    r"^\s+[-+~]*\s*(\d+ (?:created|deleted|updated|replaced|unchanged))\s*$", re.MULTILINE
)
_ACCESS = re.compile(r'"(GET|HEAD|POST|PATCH|PUT|DELETE) (\S+) HTTP/[\d.]+" (\d{3}) ')


@dataclass(frozen=True)
class Kill:
    """One crash point. `commit`/`committed`: PULUMID_TEST_FAULTS kill@HOW:AT, i.e. the
    AT-th COMMIT after the daemon's last start. `sigkill`: the test SIGKILLs the daemon
    once the update is running and AT items along in the daemon's export. `outage`: the
    daemon stays down until the CLI has given up."""

    how: str
    at: int
    outage: bool = False

    @property
    def label(self) -> str:
        if self.how == "sigkill":
            label = f"SIGKILL at {self.at} items" if self.at else "SIGKILL at update start"
        else:
            label = f"kill@{self.how}:{self.at}"
        return label + (" +outage" if self.outage else "")

    @property
    def fault(self) -> str | None:
        return None if self.how == "sigkill" else f"kill@{self.how}:{self.at}"


@dataclass(frozen=True)
class Phase:
    """An `up` of `items` items whose replaceKey is `key` (a new key replaces every item)."""

    name: str
    items: int
    key: str
    kills: tuple[Kill, ...]


def commit(n: int) -> Kill:
    return Kill("commit", n)


def committed(n: int, *, outage: bool = False) -> Kill:
    return Kill("committed", n, outage)


def sigkill(items: int, *, outage: bool = False) -> Kill:
    return Kill("sigkill", items, outage)


# Commits per phase measured here at 600 items (the points were halved with the items, to
# fit a cold CI run): 3.259.0 creates 600 items in ~190 commits (journal batches) and
# replaces them in ~380; 3.210.0 spends ~1230 (two delta checkpoints per step) on creating
# or deleting 600. Each N counts from the previous restart.
JOURNALED = (
    Phase("create", ITEMS, "g0", (commit(12), committed(20), sigkill(175), commit(10))),
    Phase(
        "replace",
        ITEMS,
        "g1",
        (committed(25), sigkill(150), commit(30), committed(20), commit(3)),
    ),
    Phase(
        "replace-again",
        ITEMS,
        "g2",
        (sigkill(0), committed(35), commit(45), sigkill(300, outage=True)),
    ),
)
CHECKPOINTED = (
    Phase(
        "create",
        ITEMS,
        "g0",
        (commit(60), committed(100), sigkill(150), commit(75), committed(3)),
    ),
    Phase(
        "delete-all",
        0,
        "g0",
        (committed(75), commit(125), sigkill(200), committed(100, outage=True)),
    ),
    Phase("recreate", ITEMS, "g1", (sigkill(0), commit(150), committed(125), commit(100))),
)


@dataclass
class Point:
    """What happened at one crash point (one line of the report)."""

    cli: str
    phase: str
    kill: str
    fired: bool = False
    seconds: float | None = None  # into the phase's `up`
    exit_code: int | None = None  # the daemon's
    last_answered: str = ""  # the CLI's last request the daemon answered before it died
    down_seconds: float | None = None  # from the kill until the daemon answered again
    outage: str = ""  # how the CLI ended while the daemon stayed down
    cloud_creates: int | None = None  # provider Creates so far (whole run)
    state_items_after_restart: int | None = None
    done_at_kill: int | None = None  # phase progress in the export that triggered a SIGKILL
    done_after_restart: int | None = None  # phase progress in the export after the restart
    phase_up_exit: int | None = None  # the phase's `up` (the one killed under), when it ended
    cancelled: bool = False
    refresh: str = ""
    converge_up: str = ""
    check: str = ""

    def summary(self) -> str:
        return (
            f"{self.cli} {self.phase:<13} {self.kill:<22} "
            f"{'fired' if self.fired else 'MISSED'} at {self.seconds or 0:5.1f}s "
            f"(after {self.last_answered or '-'}), down {self.down_seconds or 0:.1f}s"
            f"{' until ' + self.outage if self.outage else ''}; "
            f"state after restart "
            f"{self.state_items_after_restart} items, {self.done_after_restart} done; "
            f"phase up rc={self.phase_up_exit} cancel={'yes' if self.cancelled else 'no'} "
            f"refresh={self.refresh} up={self.converge_up}; check {self.check}"
        )


# --------------------------------------------------------------------------------------------
# The "cloud" and the state


@dataclass
class Cloud:
    """The test provider's create and delete logs (see tests/provider/main.go)."""

    create_log: Path
    delete_log: Path

    def env(self) -> dict[str, str]:
        return {
            "PULUMIDTEST_CREATE_LOG": str(self.create_log),
            "PULUMIDTEST_DELETE_LOG": str(self.delete_log),
        }

    def _lines(self, path: Path) -> list[tuple[str, str]]:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return []
        pairs = []
        for line in text.splitlines():
            name, _, ident = line.partition(" ")
            pairs.append((name, ident))
        return pairs

    def creates(self) -> int:
        return len(self._lines(self.create_log))

    def live(self) -> tuple[dict[str, str], list[str]]:
        """(id -> name of every created and not deleted resource, inconsistencies)."""
        problems: list[str] = []
        created: dict[str, str] = {}
        for name, ident in self._lines(self.create_log):
            if not name or not ident or ident in created:
                problems.append(f"bad or repeated create line {name!r} {ident!r}")
            created[ident] = name
        deleted: set[str] = set()
        for name, ident in self._lines(self.delete_log):
            if created.get(ident) != name:
                problems.append(f"deleted {name} {ident}, which was never created")
            if ident in deleted:
                problems.append(f"deleted {name} {ident} twice")
            deleted.add(ident)
        return {i: n for i, n in created.items() if i not in deleted}, problems


def items_of(document: dict[str, Any]) -> list[dict[str, Any]]:
    deployment = document.get("deployment") or {}
    return [r for r in deployment.get("resources") or [] if r.get("type") == ITEM_TYPE]


def done(document: dict[str, Any], phase: Phase) -> int:
    """How far along the phase is: target items in place, plus items gone that must go."""
    names = {f"extra{i}" for i in range(phase.items)}
    current = [r for r in items_of(document) if not r.get("delete")]
    placed = sum(
        1
        for r in current
        if (r.get("inputs") or {}).get("replaceKey") == phase.key
        and str(r["urn"]).rsplit("::", 1)[1] in names
    )
    present = {str(r["urn"]).rsplit("::", 1)[1] for r in current}
    gone = {f"extra{i}" for i in range(phase.items, ITEMS)} - present  # a shrinking phase's
    return placed + len(gone)


def check(cloud: Cloud, document: dict[str, Any], phase: Phase) -> list[str]:
    """Everything wrong between the cloud and the final state (empty when they agree)."""
    live, problems = cloud.live()
    deployment = document.get("deployment") or {}
    if deployment.get("pending_operations"):
        problems.append(f"pending operations left: {deployment['pending_operations']}")
    in_state: Counter[tuple[str, str]] = Counter()
    for r in items_of(document):
        in_state[(str(r["urn"]).rsplit("::", 1)[1], str(r.get("id")))] += 1
        if r.get("delete"):
            problems.append(f"{r['urn']} still marked for deletion")
        if (r.get("inputs") or {}).get("replaceKey") != phase.key:
            problems.append(f"{r['urn']} has inputs {r.get('inputs')}, not key {phase.key}")
    problems += [
        f"{name} {ident} in the state {n} times" for (name, ident), n in in_state.items() if n > 1
    ]
    cloud_pairs = {(name, ident) for ident, name in live.items()}
    per_name = Counter(name for name, _ in cloud_pairs)
    problems += [
        f"{name} exists {n} times in the cloud" for name, n in sorted(per_name.items()) if n > 1
    ]
    problems += [
        f"leaked: {n} {i} exists but is not in the state"
        for n, i in sorted(cloud_pairs - set(in_state))
    ]
    problems += [
        f"phantom: {n} {i} is in the state but not in the cloud"
        for n, i in sorted(set(in_state) - cloud_pairs)
    ]
    expected = {f"extra{i}" for i in range(phase.items)}
    if set(per_name) != expected:
        missing, extra = sorted(expected - set(per_name)), sorted(set(per_name) - expected)
        problems.append(
            f"cloud names differ from the program: missing {missing[:10]}, extra {extra[:10]}"
        )
    return problems


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class CrashRun:
    version: str
    daemon: Daemon
    cli: PulumiCLI
    project: Path
    provider_dir: Path
    cloud: Cloud
    points: list[Point] = field(default_factory=list)

    def export(self) -> dict[str, Any]:
        document: dict[str, Any] = self.daemon.api_ok(
            "GET", stack_path(self.daemon.org, "p", STACK) + "/export"
        )
        return document

    def locked(self) -> bool:
        body = self.daemon.api_ok("GET", stack_path(self.daemon.org, "p", STACK))
        return bool(body.get("currentOperation"))

    def log_size(self) -> int:
        try:
            return self.daemon.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        with self.daemon.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def restart(self, kill: Kill | None) -> None:
        """Start the daemon again (reaping it if it died), armed with `kill`'s fault."""
        if self.daemon.running:
            self.daemon.stop()
        else:
            self.daemon.kill()
        fault = kill.fault if kill is not None else None
        self.daemon.env = {"PULUMID_TEST_FAULTS": fault} if fault else {}
        self.daemon.start()

    def write_program(self, phase: Phase) -> None:
        write_yaml_program(
            self.project,
            project="p",
            provider_dir=self.provider_dir,
            count=0,
            extra_resources=phase.items,
            replace_key=phase.key,
        )

    def run_phase(self, phase: Phase) -> list[Point]:
        """The phase's `up` with its kills, then cancel/refresh/up and the check."""
        self.write_program(phase)
        kills = list(phase.kills)
        points = [Point(self.version, phase.name, k.label) for k in kills]
        self.points += points
        log_start = self.log_size()
        self.restart(kills[0])
        start = time.monotonic()
        run = self.cli.popen(*UP, cwd=self.project)
        try:
            rc = self._ride(phase, run, kills, points, start, log_start)
        finally:
            run.kill()
            kill_session(run.proc.pid)
        proc = self.daemon.proc
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{phase.name}: the daemon exited {proc.returncode} as the `up` ended")
        if self.daemon.env:  # a fault never fired: disarm it
            self.restart(None)
        for point in points:
            point.phase_up_exit = rc
        self._converge(phase, points, rc)
        self._assert_healthy(phase, points, log_start)
        return points

    def _ride(
        self,
        phase: Phase,
        run: Background,
        kills: list[Kill],
        points: list[Point],
        start: float,
        log_start: int,
    ) -> int:
        """Wait for the `up`, killing and restarting the daemon at each point on the way."""
        index = 0
        deadline = start + 600
        next_poll = 0.0
        while run.proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"{phase.name}: `up` still running after 600 s:\n{run.output()}")
            kill = kills[index] if index < len(kills) else None
            died = self.daemon.proc is not None and self.daemon.proc.poll() is not None
            trigger, seen = False, None
            if died:
                code = self.daemon.proc.returncode if self.daemon.proc else None
                if kill is None or kill.how == "sigkill" or code != -signal.SIGKILL:
                    pytest.fail(
                        f"{phase.name}: the daemon exited {code} with no kill due "
                        f"(next: {kill})\nlog:\n{self.daemon.log_text()}"
                    )
            elif kill is not None and kill.how == "sigkill" and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + 0.2
                if self.locked():
                    seen = done(self.export(), phase)
                    trigger = seen >= kill.at
            if died or trigger:
                point = points[index]
                point.seconds = round(time.monotonic() - start, 2)
                proc = self.daemon.proc
                if trigger:
                    self.daemon.kill()
                    point.done_at_kill = seen
                point.fired = True
                point.exit_code = proc.returncode if proc else None
                point.last_answered = last_request(self.log_since(log_start))
                point.cloud_creates = self.cloud.creates()
                if kills[index].outage:
                    point.outage = self._outlive(run, phase)
                index += 1
                self.restart(kills[index] if index < len(kills) else None)
                point.down_seconds = round(time.monotonic() - start - point.seconds, 2)
                document = self.export()
                point.state_items_after_restart = len(items_of(document))
                point.done_after_restart = done(document, phase)
                # What an export showed before the kill was committed: it must still be there.
                if point.done_at_kill is not None and point.done_after_restart < point.done_at_kill:
                    pytest.fail(
                        f"{phase.name}, {point.kill}: the export showed {point.done_at_kill} "
                        f"items done before the kill, {point.done_after_restart} after it"
                    )
                continue
            time.sleep(0.05)
        return run.proc.returncode

    def _outlive(self, run: Background, phase: Phase) -> str:
        """Keep the daemon down until the CLI gives up (4 tries per request over 7 s), or
        SIGKILL the CLI after OUTAGE seconds (3.210.0 fails its queued steps one by one)."""
        try:
            rc = run.proc.wait(OUTAGE)
            ending = f"the CLI gave up (exit {rc})"
        except subprocess.TimeoutExpired:
            run.kill()
            rc = run.proc.returncode
            ending = f"the CLI was SIGKILLed after {OUTAGE:.0f} s"
        assert rc != 0, f"{phase.name}: `up` succeeded with no daemon:\n{run.output()}"
        return ending

    def _converge(self, phase: Phase, points: list[Point], rc: int) -> None:
        cancelled = self.locked()
        if cancelled:
            self.cli.run("cancel", "--yes", cwd=self.project)
        refresh = self.cli.run("refresh", "--yes", cwd=self.project, check=False)
        # After an `up` that succeeded, every step was acknowledged: nothing may be left to do.
        strict = ("--expect-no-changes",) if rc == 0 else ()
        up = self.cli.run(*UP, *strict, cwd=self.project, check=False)
        problems = check(self.cloud, self.export(), phase)
        # An `up` that gave up while the daemon was down cannot have ended its update.
        if any(k.outage for k in phase.kills) and not cancelled:
            problems.append("the stack was not locked after the CLI gave up mid-update")
        for point in points:
            point.cancelled = cancelled
            point.refresh = outcome(refresh)
            point.converge_up = outcome(up) + (" expecting none" if strict else "")
            point.check = "passed" if not problems else f"FAILED: {problems[:5]}"
        assert refresh.returncode == 0, (
            f"refresh after {phase.name}:\n{refresh.stdout}\n{refresh.stderr}"
        )
        assert up.returncode == 0, f"up after {phase.name}:\n{up.stdout}\n{up.stderr}"
        assert not problems, f"after {phase.name}: {len(problems)} problems: {problems[:20]}"

    def _assert_healthy(self, phase: Phase, points: list[Point], log_start: int) -> None:
        missed = [p.kill for p in points if not p.fired]
        assert not missed, f"{phase.name}: the update ended before these kills: {missed}"
        log = self.log_since(log_start)
        errors = [
            line for line in log.splitlines() if (m := _ACCESS.search(line)) and m[3][0] == "5"
        ]
        assert not errors, f"{phase.name}: 5xx answers:\n" + "\n".join(errors[:20])
        assert "Traceback" not in log, f"{phase.name}: traceback in the daemon log:\n{log[-5000:]}"


def kill_session(sid: int) -> None:
    """SIGKILL whatever is left of the session a CLI was started in: the CLI puts its
    plugins (language host, provider) in process groups of their own, so killing the CLI's
    group leaves them running."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # After the command's "(name)": state, ppid, pgrp, session, ...
            session = int(stat.read_text().rpartition(")")[2].split()[3])
            if session == sid:
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue


def outcome(result: subprocess.CompletedProcess[str]) -> str:
    """`ok (5 deleted, 595 unchanged)` or `failed (1)`, from a CLI run's summary."""
    if result.returncode != 0:
        return f"failed ({result.returncode})"
    counts = _CHANGES.findall(result.stdout.rpartition("Resources:")[2])
    return f"ok ({', '.join(counts)})" if counts else "ok"


def last_request(log: str) -> str:
    """`METHOD last-path-segment status` of the CLI's last request in an access log."""
    matches = [
        m for line in log.splitlines() if "pulumi-cli" in line and (m := _ACCESS.search(line))
    ]
    if not matches:
        return ""
    method, path, status = matches[-1].groups()
    return f"{method} {path.rstrip('/').rsplit('/', 1)[-1]} {status}"


def requests_to(daemon: Daemon, suffix: str) -> int:
    return sum(
        1
        for m in _ACCESS.finditer(daemon.log_text(tail=10**9))
        if m[2].endswith(suffix) and m[3].startswith("2")
    )


def write_report(path: Path, points: list[Point]) -> None:
    path.write_text(json.dumps([asdict(p) for p in points], indent=2) + "\n")
    print(f"\ncrash points report: {path}")
    for point in points:
        print(point.summary())


@pytest.fixture
def crash_run(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    daemon: Daemon,
    make_cli: Callable[[str, Daemon], PulumiCLI],
    make_project: Callable[..., Path],
    provider_dir: Path,
) -> Iterator[Callable[[str], CrashRun]]:
    runs: list[CrashRun] = []

    def make(version: str) -> CrashRun:
        cli = make_cli(version, daemon)
        cloud = Cloud(tmp_path / "creates.log", tmp_path / "deletes.log")
        cli.env.update(cloud.env())
        project = make_project(cli, daemon, "p", items=0)
        cli.run("stack", "init", f"{daemon.org}/{STACK}", cwd=project)
        run = CrashRun(version, daemon, cli, project, provider_dir, cloud)
        runs.append(run)
        return run

    yield make
    for run in runs:
        write_report(tmp_path / "crash-points.json", run.points)


# Kills at SQLite's own commit steps; other stores' kills are in test_crash.py and the cluster.
@pytest.mark.storages("sqlite")
def test_crash_points_journaled(crash_run: Callable[[str], CrashRun]) -> None:
    run = crash_run("3.259.0")
    for phase in JOURNALED:
        run.run_phase(phase)
    assert requests_to(run.daemon, "/journalentries") > 100
    assert requests_to(run.daemon, "/checkpointdelta") == 0
    fired = [p.kill.split(":")[0] for p in run.points if p.fired]
    assert len(fired) >= 12 and {"kill@commit", "kill@committed"} <= set(fired), fired

    # The check catches a re-created resource: forget one item, and `up` creates it again.
    urn = str(items_of(run.export())[0]["urn"])
    run.cli.run("state", "delete", urn, "--yes", cwd=run.project)
    run.cli.run(*UP, cwd=run.project)
    name = urn.rsplit("::", 1)[1]
    problems = check(run.cloud, run.export(), JOURNALED[-1])
    assert f"{name} exists 2 times in the cloud" in problems, problems
    assert len(problems) == 2 and problems[1].startswith(f"leaked: {name} "), problems


@pytest.mark.storages("sqlite")
def test_crash_points_checkpointed(crash_run: Callable[[str], CrashRun]) -> None:
    run = crash_run("3.210.0")
    for phase in CHECKPOINTED:
        run.run_phase(phase)
    assert requests_to(run.daemon, "/checkpointdelta") > 1000
    assert requests_to(run.daemon, "/journalentries") == 0
    fired = [p.kill.split(":")[0] for p in run.points if p.fired]
    assert len(fired) >= 12 and {"kill@commit", "kill@committed"} <= set(fired), fired
