"""The hostile API suite: every route, fed wrong credentials and spoiled requests.

What is sent (tests/api/hostile_inputs.py holds the material): every route of
pulumid/api/app.py with valid, missing, wrong and other-update credentials ("token X" user
tokens, "update-token X" update tokens, among them the token of a *different* running
update, of a preview and of a finished update); malformed JSON, bodies a few MB over the
daemon's 1 MiB max_body_size (with and without a Content-Length), 100,000 nested arrays,
wrongly typed fields, non-standard JSON (NaN, Infinity, -Infinity, 1e400, 10**20, 2**63,
2**64-1, 2**64, -1, lone surrogates, duplicate keys, byte order marks, trailing garbage,
invalid UTF-8), a gzip bomb (100 MB of zeros), unknown Content-Encodings, and odd path
segments and query values (.., %2F, 8,000 characters, unicode, empty, %00, %FF, ...).

What must hold, checked after every request:

1. no answer is a 5xx, and the daemon always answers;
2. nothing in the Twisted log has a failure attached or is at level error or critical;
3. a refused (non-2xx) request changes nothing: the stacks the campaign works on, read
   through the API (GET stack, export, history, update status and events of the running
   updates, GET /api/user/stacks), are the same before and after it;
4. wrong credentials are never accepted;
5. whatever the daemon accepted, its stored states stay strict JSON (orjson, the reader
   the daemon itself uses for rename and journal replay; the CLI's Go decoder rejects
   NaN, Infinity and 1e400 as well);
6. afterwards an honest update on a new stack still succeeds end to end.

How it runs under pytest-twisted. One daemon serves the whole campaign: `hostile_server`
is a module-scoped `pytest_twisted.async_yield_fixture` around `serve()` from test_api.py
(real loopback port, 1 MiB body limit, a lease TTL far longer than the run so no lease
expires on its own). The campaign itself is the module-scoped *sync* fixture `campaign`:
it runs in pytest's main greenlet, where
`pytest_twisted.blockon(Deferred.fromCoroutine(...))` hands each request to the reactor
greenlet and waits for it. It first sends a deterministic sweep
(hostile_inputs.sweep_specs: every route with the right credentials, none, wrong ones and
another running update's token, plus other kinds in rotation; every update-token route
with every other update's token; every body route with every kind of spoiled body,
variants rotating over the routes; every path placeholder with every odd segment; query
parameters with odd values), then hypothesis explores random combinations and random
values at random places in the bodies. The hypothesis tests are plain sync `@given`
functions called from the fixture; each example materialises a symbolic probe against the
stacks and updates the campaign holds at that moment, sends it and checks 1-5. Nothing
raises inside an example: findings are collected, so hypothesis never shrinks (no extra
requests against a daemon whose state earlier examples changed), the run is bounded (fixed
max_examples, derandomize=True, no example database: the same requests in every run) and
the tests below report every failing request at once. (pytest-twisted can also put
`@given` on an async test directly, but a failing example would then stop the run and be
shrunk.)

The counts (requests, probes, 5xx, ...) and every finding are written to
`summary.json` in a pytest tmp directory; `test_campaign_summary` prints its path and
the counts, and asserts the campaign covered every route.

The regression tests pin each hostile case by name, each against its own
daemon so that one case cannot hide or cause another.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.web.client import (
    UNKNOWN_LENGTH,
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    readBody,
)
from twisted.web.http_headers import Headers
from zope.interface import implementer

from tests.api import hostile_inputs as h
from tests.api.hostile_inputs import ROUTE, Body, BodyContext, Mutation, ProbeSpec
from tests.api.test_api import ORG, TOKEN, USER, Server, serve

pytestmark = pytest.mark.live

SERVER_OPTIONS: dict[str, Any] = {
    "max_body_size": h.MAX_BODY_SIZE,
    "lease_ttl": 3600.0,  # no lease runs out during the run unless a request shortens it
    "page_size": 100_000,  # GET /api/user/stacks shows every stack in one page
}
REQUEST_TIMEOUT = 60.0
PROJECT = "web"
UNKNOWN_UPDATE = "00000000-0000-4000-8000-000000000000"
MISSING_STACK = "missing-stack"

# Examples per hypothesis exploration (with the sweep, the file stays well under 4 minutes
# on 2 cores).
EXAMPLES = {"credentials": 150, "bodies": 350, "paths": 120, "mixed": 200}

EXPLORATION_SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=(
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ),
    print_blob=False,
)


_IDS = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|"
    r"(?<=/)[abc]\d+(?=[/'\]])|made\d+|finished\d+"
)


def generic(text: str, numbers: bool = False) -> str:
    """Text with update ids and campaign stack names (and numbers) blanked, for grouping."""
    text = _IDS.sub("<id>", text)
    return re.sub(r"\d+", "N", text) if numbers else text


def _excerpt(data: bytes | None, size: int = 160) -> str:
    if data is None:
        return "(no body)"
    text = repr(data[:size])
    return f"{text}{'...' if len(data) > size else ''} ({len(data)} bytes)"


# -- the Twisted log -----------------------------------------------------------------------


@dataclass
class LogProblem:
    during: str
    level: str
    text: str

    def line(self) -> str:
        return f"[{self.level}] during {self.during}: {self.text}"


@implementer(ILogObserver)
class LogCapture:
    """A global log observer keeping failures and error/critical events, with the request
    that was in flight when they were logged."""

    def __init__(self) -> None:
        self.problems: list[LogProblem] = []
        self.during = "setup"
        self.active = True

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.active:
            return
        try:
            failure = event.get("log_failure")
            level = event.get("log_level")
            if (
                failure is None
                and level not in (LogLevel.error, LogLevel.critical)
                and not event.get("isError")
            ):
                return
            # Legacy log.err events carry their traceback in the text: keep the first line.
            text = (formatEvent(event) or str(event.get("log_format"))).split("\n")[0][:300]
            if failure is not None:
                text += f" [{failure.type.__name__}: {str(failure.getErrorMessage())[:200]}"
                frames = getattr(failure, "frames", None)
                if frames:
                    _name, filename, line = frames[-1][:3]
                    text += f" at {Path(filename).name}:{line}"
                text += "]"
            name = level.name if isinstance(level, LogLevel) else "error"
            self.problems.append(LogProblem(self.during, name, text))
        except Exception as e:  # an observer must never raise
            self.problems.append(LogProblem(self.during, "observer", repr(e)))


# -- requests and findings -----------------------------------------------------------------


@dataclass
class Answer:
    status: int | None  # None: no answer (connection dropped, timeout)
    body: bytes
    error: str = ""

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def show(self) -> str:
        if self.status is None:
            return f"no answer ({self.error})"
        return f"{self.status} {_excerpt(self.body, 240)}"


@dataclass
class Finding:
    kind: str
    phase: str
    label: str
    method: str
    path: str
    request: str
    answer: str
    detail: str = ""

    def line(self) -> str:
        path = self.path if len(self.path) < 200 else self.path[:200] + "..."
        text = f"{self.method} {path} [{self.label}] body={self.request} -> {self.answer}"
        return text + (f" :: {self.detail}" if self.detail else "")

    def signature(self) -> str:
        """Findings that differ only in ids, names and sequence numbers group together."""
        return f"{self.kind} | {self.label} | {generic(self.answer[:120], numbers=True)}"

    def as_json(self) -> dict[str, str]:
        return dict(self.__dict__)


def report(findings: list[Finding], problems: list[LogProblem] | None = None) -> str:
    lines: list[str] = []
    groups: dict[str, list[Finding]] = {}
    for finding in findings:
        groups.setdefault(finding.signature(), []).append(finding)
    if findings:
        lines.append(f"{len(findings)} failing requests, {len(groups)} distinct:")
    for members in groups.values():
        lines.append(f"- ({len(members)}x) {members[0].line()}")
        lines.extend(f"      also: {m.line()[:300]}" for m in members[1:4])
    if problems:
        distinct: dict[str, list[LogProblem]] = {}
        for problem in problems:
            distinct.setdefault(generic(problem.text, numbers=True), []).append(problem)
        lines.append(f"{len(problems)} log events with a failure or at error level:")
        for events in distinct.values():
            during = sorted({generic(e.during[:200]) for e in events})
            lines.append(f"- ({len(events)}x) [{events[0].level}] {events[0].text}")
            lines.extend(f"      during: {d}" for d in during[:4])
    return "\n".join(lines)


# -- the stacks and updates a campaign works on --------------------------------------------


@dataclass
class World:
    """A: a journaling update U1 and a preview U3 running; B: a checkpointing update U2
    running, with a verbatim checkpoint; C: idle, with state, a secret and tags, and a
    created update N that has not started."""

    generation: int
    a: str
    b: str
    c: str
    u1: str = UNKNOWN_UPDATE
    t1: str = "missing-token-1"
    u2: str = UNKNOWN_UPDATE
    t2: str = "missing-token-2"
    u3: str = UNKNOWN_UPDATE
    t3: str = "missing-token-3"
    n: str = UNKNOWN_UPDATE
    ciphertext: str = ""
    event_sequence: int = 1
    journal_sequence: int = 1
    checkpoint_sequence: int = 2

    def updates(self) -> dict[str, tuple[str, str, str | None]]:
        """target -> (stack in the path, update id in the path, that update's token)."""
        return {
            "U1": (self.a, self.u1, self.t1),
            "U2": (self.b, self.u2, self.t2),
            "U3": (self.a, self.u3, self.t3),
            "N": (self.c, self.n, None),
            "U1@B": (self.b, self.u1, self.t1),
            "unknown": (self.a, UNKNOWN_UPDATE, None),
            "U1@missing": (MISSING_STACK, self.u1, self.t1),
        }

    def stacks(self) -> dict[str, str]:
        return {"A": self.a, "B": self.b, "C": self.c, "missing": MISSING_STACK}


@dataclass
class Snapshot:
    views: dict[str, str]
    exports: dict[str, bytes]
    unreadable: dict[str, str]  # world stack -> why its export is not strict JSON

    def diff(self, other: Snapshot) -> list[str]:
        """Views that differ; a read that failed (5xx) on either side proves nothing here
        (it is reported as a server error already, and a broken daemon answers at random)."""
        changed = []
        for name in sorted(set(self.views) | set(other.views)):
            before, after = self.views.get(name, "(absent)"), other.views.get(name, "(absent)")
            if before[:1] == "5" or after[:1] == "5":
                continue
            if before != after:
                changed.append(f"{name}: {before[:300]!r} -> {after[:300]!r}")
        return changed


def normalized_export(data: bytes) -> str:
    """The export without what changes by itself (a journaling update's manifest time)."""
    try:
        document = json.loads(data)  # lenient on purpose: a NaN must not hide a change
    except ValueError:
        return data.decode("utf-8", "replace")
    deployment = document.get("deployment") if isinstance(document, dict) else None
    if isinstance(deployment, dict) and isinstance(deployment.get("manifest"), dict):
        deployment["manifest"].pop("time", None)
    return json.dumps(document, sort_keys=True)


def strict_json_error(data: bytes) -> str | None:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError as e:
        return str(e)
    return None


@dataclass
class Prepared:
    method: str
    path: str
    auth: str | None
    body: Body
    credentials_valid: bool


@dataclass
class ProbeResult:
    spec: ProbeSpec
    prepared: Prepared
    answer: Answer
    changes: list[str]

    def expect(self, *codes: int) -> str | None:
        """None if the answer is one of codes, else a line saying what came instead."""
        if self.answer.status in codes:
            return None
        return f"{self.spec.describe()}: expected {codes}, got {self.answer.show()}"


# -- the arena: one daemon, its world, every request and finding ---------------------------


class Arena:
    def __init__(self, server: Server, log: LogCapture) -> None:
        self.server = server
        self.log = log
        self.requests = 0
        self.by_phase: Counter[str] = Counter()
        self.probes = 0
        self.accepted = 0
        self.status_counts: Counter[str] = Counter()
        self.findings: list[Finding] = []
        self.setup_problems: list[str] = []
        self.coverage: dict[str, dict[str, set[str]]] = {}
        self.world: World | None = None
        self.before: Snapshot | None = None
        self.generations = itertools.count(1)
        self.names = itertools.count(1)
        self.finished_token = "missing-finished-token"
        self.failing_views: set[str] = set()  # snapshot views that have answered 5xx
        self.accepted_spoiled: Counter[str] = Counter()  # lenient, not wrong: for the record
        # Snapshots read through kept-alive connections (they are most of the requests);
        # probes each get a fresh connection, as hostile clients would.
        self._observer_pool = HTTPConnectionPool(reactor, persistent=True)
        self._observer = Agent(reactor, pool=self._observer_pool)

    async def close(self) -> None:
        await self._observer_pool.closeCachedConnections()

    # -- raw requests --------------------------------------------------------------------

    async def send(
        self,
        phase: str,
        label: str,
        method: str,
        path: str,
        body: Body | None = None,
        auth: str | None = None,
        *,
        tolerate_drop: bool = False,
        agent: Agent | None = None,
    ) -> Answer:
        headers = Headers()
        if auth is not None:
            headers.addRawHeader(b"authorization", auth.encode("utf-8"))
        producer = None
        if body is not None:
            for name, value in body.headers:
                headers.addRawHeader(name.encode(), value.encode())
            if body.data is not None:
                headers.addRawHeader(b"content-type", b"application/json")
                producer = FileBodyProducer(BytesIO(body.data))
                if body.chunked:
                    producer.length = UNKNOWN_LENGTH
        self.requests += 1
        self.by_phase[phase] += 1
        self.log.during = f"{method} {path[:120]} [{label}]"
        try:
            requested: Deferred[Any] = (agent or self.server.agent).request(
                method.encode(), (self.server.url + path).encode("ascii"), headers, producer
            )
            requested.addTimeout(REQUEST_TIMEOUT, reactor)
            response = await requested
            reading: Deferred[bytes] = readBody(response)
            reading.addTimeout(REQUEST_TIMEOUT, reactor)
            answer = Answer(response.code, await reading)
        except Exception as e:
            answer = Answer(None, b"", f"{type(e).__name__}: {e}"[:300])
        finally:
            self.log.during = "between requests"
        if (answer.status is None and not tolerate_drop) or (answer.status or 0) >= 500:
            self.findings.append(
                Finding(
                    "server-error",
                    phase,
                    label,
                    method,
                    path,
                    _excerpt(body.data if body else None),
                    answer.show(),
                )
            )
        return answer

    async def call(
        self, label: str, method: str, path: str, value: Any = None, auth: str | None = None
    ) -> Any:
        """A setup request that must succeed; returns the decoded answer (or None)."""
        data = None if value is None else json.dumps(value).encode()
        answer = await self.send("setup", label, method, path, Body(data), auth or f"token {TOKEN}")
        if not answer.accepted:
            self.setup_problems.append(f"{label}: {method} {path} -> {answer.show()}")
            return None
        return json.loads(answer.body) if answer.body else {}

    # -- the world -------------------------------------------------------------------------

    async def start(self) -> None:
        """The first world, and the token of an update that has finished."""
        base = await self._stack(f"finished{next(self.names)}")
        created = await self.call("setup finished", "POST", f"{base}/update", {})
        if created:
            update = created["updateID"]
            started = await self.call("setup finished", "POST", f"{base}/update/{update}", {})
            if started:
                self.finished_token = started["token"]
                await self.call(
                    "setup finished",
                    "POST",
                    f"{base}/update/{update}/complete",
                    {"status": "succeeded"},
                    f"update-token {self.finished_token}",
                )
        await self.rebuild()

    async def _stack(self, name: str) -> str:
        await self.call("setup stack", "POST", f"/api/stacks/{ORG}/{PROJECT}", {"stackName": name})
        return f"/api/stacks/{ORG}/{PROJECT}/{name}"

    async def rebuild(self) -> None:
        """A fresh world on new stacks (the old ones stay, idle or with updates running)."""
        generation = next(self.generations)
        world = World(generation, f"a{generation}", f"b{generation}", f"c{generation}")
        a, b, c = [await self._stack(name) for name in (world.a, world.b, world.c)]
        value = h.untyped([h.resource("c-one", 1), h.resource("c-two", 2)])
        await self.call("setup import", "POST", f"{c}/import", value)
        secret = await self.call("setup encrypt", "POST", f"{c}/encrypt", {"plaintext": "cHc="})
        world.ciphertext = secret["ciphertext"] if secret else ""
        await self.call("setup tags", "PATCH", f"{c}/tags", {"team": "red"})
        world.u1, world.t1 = await self._start(a, {"journalVersion": 1})
        world.u3, world.t3 = await self._start(a, {}, {"options": {"dryRun": True}})
        world.u2, world.t2 = await self._start(b, {})
        checkpoint = {
            "version": 1,
            "untypedDeployment": h.untyped([h.resource("b-one", 1)]),
            "sequenceNumber": 1,
        }
        await self.call(
            "setup verbatim",
            "PATCH",
            f"{b}/update/{world.u2}/checkpointverbatim",
            checkpoint,
            f"update-token {world.t2}",
        )
        created = await self.call("setup update", "POST", f"{c}/update", {})
        world.n = created["updateID"] if created else UNKNOWN_UPDATE
        self.world = world
        self.before = await self.snapshot()

    async def _start(
        self, base: str, start: dict[str, Any], create: dict[str, Any] | None = None
    ) -> tuple[str, str]:
        created = await self.call("setup update", "POST", f"{base}/update", create or {})
        if not created:
            return UNKNOWN_UPDATE, "missing-token"
        update = created["updateID"]
        started = await self.call("setup start", "POST", f"{base}/update/{update}", start)
        return update, (started or {}).get("token", "missing-token")

    # -- observing ---------------------------------------------------------------------------

    async def _view(self, name: str, path: str) -> tuple[str, Answer]:
        answer = await self.send(
            "snapshot",
            f"snapshot {name}",
            "GET",
            path,
            None,
            f"token {TOKEN}",
            agent=self._observer,
        )
        return name, answer

    async def snapshot(self) -> Snapshot:
        w = self.world
        assert w is not None
        base = f"/api/stacks/{ORG}/{PROJECT}"
        # Reading events flushes what is buffered: later reads see it all, and no timer
        # flush lands between two snapshots.
        first = [await self._view("events U1", f"{base}/{w.a}/update/{w.u1}/events")]
        paths = {"list": "/api/user/stacks", "events U2": f"{base}/{w.b}/update/{w.u2}/events"}
        for key, stack in (("A", w.a), ("B", w.b), ("C", w.c)):
            paths[f"stack {key}"] = f"{base}/{stack}"
            paths[f"export {key}"] = f"{base}/{stack}/export"
            paths[f"history {key}"] = f"{base}/{stack}/updates?pageSize=100"
        # U1 and U2 show in the histories; the preview and the unstarted update do not.
        for key, (stack, update, _token) in w.updates().items():
            if key in ("U3", "N"):
                paths[f"status {key}"] = f"{base}/{stack}/update/{update}"
        rest: list[tuple[str, Answer]] = await defer.gatherResults(
            [Deferred.fromCoroutine(self._view(name, path)) for name, path in paths.items()]
        )
        views: dict[str, str] = {}
        exports: dict[str, bytes] = {}
        unreadable: dict[str, str] = {}
        for name, answer in first + rest:
            if name.startswith("export "):
                exports[name[7:]] = answer.body
                if answer.status is not None and answer.status != 200 and answer.status != 404:
                    # (404: an accepted rename or delete took the stack away.)
                    unreadable[name[7:]] = f"export answers {answer.show()}"
                elif (error := strict_json_error(answer.body)) is not None:
                    unreadable[name[7:]] = f"export is not strict JSON: {error}"
                text = normalized_export(answer.body) if answer.status == 200 else ""
                views[name] = f"{answer.status} {text or answer.body.decode('utf-8', 'replace')}"
            else:
                views[name] = f"{answer.status} {answer.body.decode('utf-8', 'replace')}"
        return Snapshot(views, exports, unreadable)

    # -- probes ----------------------------------------------------------------------------

    def context(self) -> BodyContext:
        w = self.world
        assert w is not None and self.before is not None
        return BodyContext(
            project=PROJECT,
            fresh_name=f"made{next(self.names)}",
            ciphertext=w.ciphertext,
            event_sequence=w.event_sequence,
            journal_sequence=w.journal_sequence,
            checkpoint_sequence=w.checkpoint_sequence,
            baseline=self.before.exports.get("B", b""),
        )

    def prepare(self, spec: ProbeSpec) -> Prepared:
        w = self.world
        assert w is not None
        route = spec.route
        values = {"org": ORG, "project": PROJECT, "kind": spec.kind, "version": "1"}
        own: str | None = None
        if route.is_update_route:
            stack, update, own = w.updates()[spec.target]
            values.update(stack=stack, update=update)
        elif "{stack}" in route.template:
            values["stack"] = w.stacks()[spec.target]
        if spec.path_twist:
            values[spec.path_twist.placeholder] = spec.path_twist.segment
        path = route.template.format(**values)
        if spec.query_twist:
            path += "?" + spec.query_twist.query
        auth = self.credentials(spec.auth, own)
        if route.auth == "user":
            valid = {f"token {TOKEN}", f"TOKEN {TOKEN}"}
        else:
            valid = {f"update-token {own}"} if own else set()
        body = Body(None)
        if route.has_body or spec.mutation is not h.VALID:
            ctx = self.context()
            body = h.spoil(route.name, h.valid_body(route.name, ctx), spec.mutation, ctx)
        return Prepared(route.method, path, auth, body, auth in valid)

    def credentials(self, kind: str, own: str | None) -> str | None:
        w = self.world
        assert w is not None
        mine = own or w.t1
        other = w.t2 if mine != w.t2 else w.t1
        return {
            "user": f"token {TOKEN}",
            "user-upper-scheme": f"TOKEN {TOKEN}",
            "none": None,
            "user-wrong": "token wrong-token",
            "user-empty": "token ",
            "user-bearer": f"Bearer {TOKEN}",
            "user-basic": "Basic " + h.b64(f"{USER}:{TOKEN}".encode()),
            "user-long": "token " + "x" * 8000,
            "user-non-ascii": "token t\u00f6k\u00e9n-\u00fc",
            "user-with-update-token": f"token {mine}",
            "update-with-user-token": f"update-token {TOKEN}",
            "update-own": f"update-token {mine}",
            "update-other": f"update-token {other}",
            "update-preview": f"update-token {w.t3}",
            "update-finished": f"update-token {self.finished_token}",
            "update-wrong": "update-token wrong-token",
            "update-empty": "update-token ",
            "update-long": "update-token " + "y" * 8000,
        }[kind]

    async def probe(self, spec: ProbeSpec, *, observe: bool = True) -> ProbeResult:
        """Send one probe. With observe, snapshot after it and check it alone; without,
        only after an accepted one (check_unchanged covers a batch of refused ones)."""
        if self.world is None:
            await self.rebuild()
        before = self.before
        assert before is not None
        prepared = self.prepare(spec)
        label = spec.describe()
        answer = await self.send(
            "probe", label, prepared.method, prepared.path, prepared.body, prepared.auth
        )
        self.probes += 1
        self.status_counts[str(answer.status)] += 1
        seen = self.coverage.setdefault(spec.route.name, {})
        seen.setdefault("auth", set()).add(spec.auth)
        seen.setdefault("mutation", set()).add(spec.mutation.label)
        seen.setdefault("target", set()).add(spec.target)
        if spec.path_twist:
            seen.setdefault("path", set()).add(spec.path_twist.label)
        if not observe and not answer.accepted:
            return ProbeResult(spec, prepared, answer, [])
        after = await self.snapshot()
        request = _excerpt(prepared.body.data)

        def finding(kind: str, detail: str) -> None:
            self.findings.append(
                Finding(
                    kind,
                    "probe",
                    label,
                    prepared.method,
                    prepared.path,
                    request,
                    answer.show(),
                    detail,
                )
            )

        changes: list[str] = []
        if answer.accepted:
            self.accepted += 1
            if spec.mutation.kind not in ("valid", "gzip") or spec.path_twist or spec.query_twist:
                self.accepted_spoiled[generic(label)] += 1
            if not prepared.credentials_valid:
                finding("wrong-credentials-accepted", f"Authorization: {prepared.auth!r}"[:200])
        else:
            changes = before.diff(after)
            if changes:
                finding("refused-but-changed", "; ".join(changes)[:1500])
        for stack, why in sorted(after.unreadable.items()):
            if stack not in before.unreadable:
                finding("unreadable-state", f"stack {stack}: {why}"[:600])
        broken = [
            f"{name}: {after.views[name][:200]}"
            for name in sorted(after.views)
            if after.views[name][:1] == "5"
            and before.views.get(name, "")[:1] not in ("5", "")
            and name not in self.failing_views
        ]
        if broken:  # the first time a read starts failing: this probe is the likely cause
            finding("reads-broken-after", "; ".join(broken)[:800])
        self.failing_views.update(n for n, v in after.views.items() if v[:1] == "5")
        self.before = after
        if answer.accepted:
            await self.settle(spec)
        return ProbeResult(spec, prepared, answer, changes)

    async def check_unchanged(self, what: str) -> None:
        """The refused probes since the last snapshot changed nothing, together."""
        before = self.before
        assert before is not None
        after = await self.snapshot()
        if changes := before.diff(after):
            self.findings.append(
                Finding(
                    "refused-but-changed",
                    "probe",
                    what,
                    "-",
                    "-",
                    "-",
                    "-",
                    "; ".join(changes)[:1500],
                )
            )
        for stack, why in sorted(after.unreadable.items()):
            if stack not in before.unreadable:
                self.findings.append(
                    Finding(
                        "unreadable-state",
                        "probe",
                        what,
                        "-",
                        "-",
                        "-",
                        "-",
                        f"stack {stack}: {why}"[:600],
                    )
                )
        self.before = after

    async def settle(self, spec: ProbeSpec) -> None:
        """After an accepted probe: fresh sequence numbers, and a world that still works."""
        w = self.world
        assert w is not None
        name = spec.route.name
        if name in ("events_batch", "event"):
            w.event_sequence += 2
        elif name == "journal_entries":
            w.journal_sequence += 2
        elif name.startswith("checkpoint"):
            w.checkpoint_sequence += 1
        if name == "renew_lease" and spec.target in ("U1", "U2", "U3"):
            # The request may have shortened the lease: renew it for the TTL (duration 0).
            stack, update, token = w.updates()[spec.target]
            renewed = await self.send(
                "setup",
                "repair lease",
                "POST",
                f"/api/stacks/{ORG}/{PROJECT}/{stack}/update/{update}/renew_lease",
                Body(b'{"duration": 0}'),
                f"update-token {token}",
            )
            if not renewed.accepted:
                await self.server.backend.expire_leases()
                await self.rebuild()
                return
        if name in h.DESTRUCTIVE or (name == "import" and spec.target in ("A", "B")):
            await self.rebuild()

    def run(self, spec: ProbeSpec) -> ProbeResult:
        """From pytest's main greenlet: one probe, the reactor driven until it is done."""
        result: ProbeResult = pytest_twisted.blockon(Deferred.fromCoroutine(self.probe(spec)))
        return result

    # -- results -----------------------------------------------------------------------------

    def of_kind(self, *kinds: str) -> list[Finding]:
        return [f for f in self.findings if f.kind in kinds]

    def assert_clean(self, extra: list[str] | None = None) -> None:
        """Every check at once: 5xx, log, refused-but-changed, credentials, stored states."""
        lines = list(extra or [])
        lines += [f"setup: {p}" for p in self.setup_problems]
        text = report(self.findings, self.log.problems)
        if lines or text:
            pytest.fail("\n".join([*lines, text]), pytrace=False)

    def summary(self, seconds: float) -> dict[str, Any]:
        kinds = Counter(f.kind for f in self.findings)
        return {
            "seconds": round(seconds, 1),
            "requests": self.requests,
            "requests_by_phase": dict(self.by_phase),
            "probes": self.probes,
            "accepted": self.accepted,
            "refused": self.probes - self.accepted,
            "status_counts": dict(self.status_counts),
            "server_errors": kinds["server-error"],
            "probe_server_errors": sum(
                1 for f in self.findings if f.kind == "server-error" and f.phase == "probe"
            ),
            "refused_but_changed": kinds["refused-but-changed"],
            "wrong_credentials_accepted": kinds["wrong-credentials-accepted"],
            "unreadable_states": kinds["unreadable-state"],
            "log_problems": len(self.log.problems),
            "setup_problems": self.setup_problems,
            "worlds": next(self.generations) - 1,
            "accepted_spoiled": dict(sorted(self.accepted_spoiled.items())),
            "coverage": {
                route: {key: sorted(values) for key, values in seen.items()}
                for route, seen in sorted(self.coverage.items())
            },
            "findings": [f.as_json() for f in self.findings],
            "log": [p.__dict__ for p in self.log.problems],
        }


# -- regression tests: each hostile case by name, each on its own daemon --------------------


@pytest_twisted.async_yield_fixture()
async def arena(tmp_path: Path) -> AsyncIterator[Arena]:
    log = LogCapture()
    globalLogPublisher.addObserver(log)
    try:
        async with serve(tmp_path, **SERVER_OPTIONS) as server:
            subject = Arena(server, log)
            await subject.start()
            yield subject
            await subject.close()
    finally:
        globalLogPublisher.removeObserver(log)


correct_auth = h.correct_auth


READS_BODY = tuple(
    r for r in h.BODY_ROUTES if r.name not in ("log_decryption", "log_batch_decryption")
)


async def expect_all(arena: Arena, specs: list[ProbeSpec], codes: tuple[int, ...]) -> None:
    """Send every probe; then one failure listing every unexpected answer and finding."""
    wrong = []
    for spec in specs:
        result = await arena.probe(spec, observe=False)
        if (line := result.expect(*codes)) is not None:
            wrong.append(line)
    await arena.check_unchanged(f"the refused requests of this test ({len(specs)} sent)")
    arena.assert_clean(wrong)


@pytest_twisted.ensureDeferred
async def test_missing_and_wrong_credentials_are_refused_on_every_route(arena: Arena) -> None:
    specs: list[tuple[ProbeSpec, tuple[int, ...]]] = []
    for route in h.ROUTES:
        if route.auth == "user":
            kinds = [
                "none",
                "user-wrong",
                "user-empty",
                "user-bearer",
                "user-basic",
                "user-long",
                "user-non-ascii",
                "user-with-update-token",
                "update-with-user-token",
            ]
            codes: tuple[int, ...] = (401,)
        else:
            kinds = [
                "none",
                "user",
                "update-wrong",
                "update-empty",
                "update-long",
                "update-with-user-token",
            ]
            codes = (401, 403)
        specs += [(ProbeSpec(route, route.target, kind), codes) for kind in kinds]
    wrong = []
    for spec, expected in specs:
        result = await arena.probe(spec, observe=False)
        if (line := result.expect(*expected)) is not None:
            wrong.append(line)
    await arena.check_unchanged(f"the refused requests of this test ({len(specs)} sent)")
    arena.assert_clean(wrong)


@pytest_twisted.ensureDeferred
async def test_another_running_updates_token_is_refused(arena: Arena) -> None:
    specs = [
        ProbeSpec(route, target, kind)
        for route in h.UPDATE_TOKEN_ROUTES
        for target in ("U1", "U2", "U3")
        for kind in ("update-other", "update-preview", "update-finished")
        if not (target == "U3" and kind == "update-preview")
    ]
    await expect_all(arena, specs, (403,))


@pytest_twisted.ensureDeferred
async def test_malformed_json_is_a_400(arena: Arena) -> None:
    malformed = [
        "truncated",
        "single-quotes",
        "bare-word",
        "binary",
        "trailing-comma",
        "unquoted-key",
        "hex-number",
        "leading-zero",
        "utf16",
        "nul-bytes",
    ]
    specs = [
        ProbeSpec(
            route,
            route.target,
            correct_auth(route),
            Mutation("raw", f"malformed-{k}", value=h.MALFORMED[k]),
        )
        for route in READS_BODY
        for k in malformed
    ]
    await expect_all(arena, specs, (400,))


@pytest_twisted.ensureDeferred
async def test_bodies_over_the_limit_are_a_413(arena: Arena) -> None:
    specs = [
        ProbeSpec(route, route.target, correct_auth(route), Mutation(kind, kind))
        for route in READS_BODY
        for kind in ("oversize", "oversize-chunked")
    ]
    await expect_all(arena, specs, (413,))


@pytest_twisted.ensureDeferred
async def test_gzip_bomb_is_a_413(arena: Arena) -> None:
    specs = [
        ProbeSpec(route, route.target, correct_auth(route), Mutation("gzip-bomb", "gzip-bomb"))
        for route in READS_BODY
    ]
    await expect_all(arena, specs, (413,))


@pytest_twisted.ensureDeferred
async def test_unknown_content_encoding_is_refused(arena: Arena) -> None:
    specs = [
        ProbeSpec(
            route,
            route.target,
            correct_auth(route),
            Mutation("encoding", f"encoding-{value}", value=value),
        )
        for route in READS_BODY
        for value in ("br", "x-hostile", "gzip, gzip", "compress")
    ]
    await expect_all(arena, specs, (400, 415))


@pytest.mark.parametrize("where", ["top-level", "inside-the-envelope"])
@pytest_twisted.ensureDeferred
async def test_deep_nesting_is_a_400(arena: Arena, where: str) -> None:
    specs = []
    for route in READS_BODY:
        if where == "top-level":
            mutation = Mutation("deep", "deep-nesting")
        else:
            mutation = Mutation("replace", "deep-nesting", h.body_paths(route.name)[0], h.Deep())
        specs.append(ProbeSpec(route, route.target, correct_auth(route), mutation))
    await expect_all(arena, specs, (400,))


# Where a state (or part of one) travels in a body; a stored state must stay readable.
STATE_FIELDS = [
    ("import", ("deployment", "resources", 0, "outputs", "n")),
    ("checkpoint", ("deployment", "resources", 0, "outputs", "n")),
    ("checkpoint_verbatim", ("untypedDeployment", "deployment", "resources", 0, "outputs", "n")),
    ("create_stack", ("state", "deployment", "resources", 0, "outputs", "n")),
    ("journal_entries", ("entries", 1, "state", "outputs", "n")),
]


@pytest.mark.parametrize("token", sorted(h.NON_FINITE))
@pytest.mark.parametrize(
    ("route_name", "path"), STATE_FIELDS, ids=[name for name, _ in STATE_FIELDS]
)
@pytest_twisted.ensureDeferred
async def test_non_finite_numbers_in_states_are_refused(
    arena: Arena, route_name: str, path: h.Path, token: str
) -> None:
    route = ROUTE[route_name]
    mutation = Mutation("replace", token, path, h.NON_FINITE[token])
    await expect_all(arena, [ProbeSpec(route, route.target, correct_auth(route), mutation)], (400,))


@pytest.mark.parametrize("token", sorted(h.SURROGATES))
@pytest.mark.parametrize(
    ("route_name", "path"), STATE_FIELDS, ids=[name for name, _ in STATE_FIELDS]
)
@pytest_twisted.ensureDeferred
async def test_lone_surrogates_in_states_are_refused(
    arena: Arena, route_name: str, path: h.Path, token: str
) -> None:
    route = ROUTE[route_name]
    mutation = Mutation("replace", token, path, h.SURROGATES[token])
    await expect_all(arena, [ProbeSpec(route, route.target, correct_auth(route), mutation)], (400,))


@pytest.mark.parametrize("label", sorted(h.DELTA_TEXTS))
@pytest_twisted.ensureDeferred
async def test_delta_checkpoints_that_produce_unreadable_states_are_refused(
    arena: Arena, label: str
) -> None:
    route = ROUTE["checkpoint_delta"]
    mutation = Mutation("delta-text", label, None, h.DELTA_TEXTS[label])
    await expect_all(arena, [ProbeSpec(route, "U2", "update-own", mutation)], (400,))


SEQUENCE_FIELDS = [
    ("events_batch", ("events", 0, "sequence")),
    ("event", ("sequence",)),
    ("checkpoint_verbatim", ("sequenceNumber",)),
    ("checkpoint_delta", ("sequenceNumber",)),
    ("journal_entries", ("entries", 0, "sequenceID")),
    ("journal_entries", ("entries", 0, "operationID")),
    ("import", ("version",)),
    ("checkpoint", ("version",)),
    ("renew_lease", ("duration",)),
    ("start_update", ("journalVersion",)),
]


@pytest.mark.parametrize("number", sorted(h.BIG_INTS))
@pytest.mark.parametrize(
    ("route_name", "path"),
    SEQUENCE_FIELDS,
    ids=[f"{name}.{'.'.join(map(str, path))}" for name, path in SEQUENCE_FIELDS],
)
@pytest_twisted.ensureDeferred
async def test_huge_and_negative_integers_in_sequences_and_versions(
    arena: Arena, route_name: str, path: h.Path, number: str
) -> None:
    """Refused or accepted, but never a 5xx, and the daemon keeps working afterwards."""
    route = ROUTE[route_name]
    mutation = Mutation("replace", number, path, h.BIG_INTS[number])
    result = await arena.probe(ProbeSpec(route, route.target, correct_auth(route), mutation))
    problems = []
    if result.answer.status is None or result.answer.status >= 500:
        problems.append(f"{result.spec.describe()}: {result.answer.show()}")
    problems += await healthy(arena)
    arena.assert_clean(problems)


async def healthy(arena: Arena) -> list[str]:
    """The running updates can still be read, and still complete."""
    w = arena.world
    assert w is not None
    base = f"/api/stacks/{ORG}/{PROJECT}"
    problems = []
    for target in ("U1", "U2"):
        stack, update, token = w.updates()[target]
        path = f"{base}/{stack}/update/{update}"
        reply = await arena.send(
            "check", f"events {target}", "GET", f"{path}/events", None, f"token {TOKEN}"
        )
        if reply.status != 200:
            problems.append(f"afterwards GET events of {target}: {reply.show()}")
        reply = await arena.send(
            "check",
            f"complete {target}",
            "POST",
            f"{path}/complete",
            Body(b'{"status": "succeeded"}'),
            f"update-token {token}",
        )
        if reply.status != 204:
            problems.append(f"afterwards complete {target}: {reply.show()}")
        reply = await arena.send("check", "status", "GET", path, None, f"token {TOKEN}")
        if reply.status != 200 or b"succeeded" not in reply.body:
            problems.append(f"afterwards status of {target}: {reply.show()}")
    return problems


@pytest.mark.parametrize(
    "path",
    [
        "export/100000000000000000000",
        "export/18446744073709551616",
        "export/-1",
        "export/0",
        "updates?page=100000000000000000000",
        "updates?pageSize=18446744073709551616",
        "updates?page=-1",
        "updates?pageSize=0",
    ],
)
@pytest_twisted.ensureDeferred
async def test_huge_and_negative_integers_in_paths_are_a_400(arena: Arena, path: str) -> None:
    w = arena.world
    assert w is not None
    reply = await arena.send(
        "probe",
        path,
        "GET",
        f"/api/stacks/{ORG}/{PROJECT}/{w.c}/{path}",
        None,
        f"token {TOKEN}",
    )
    arena.assert_clean([] if reply.status == 400 else [f"GET {path}: {reply.show()}"])


@pytest.mark.parametrize("hostile", ["first", "last"])
@pytest.mark.parametrize(
    ("route_name", "key"),
    [
        ("import", "version"),
        ("import", "deployment"),
        ("checkpoint", "version"),
        ("checkpoint", "deployment"),
        ("checkpoint_verbatim", "untypedDeployment"),
        ("checkpoint_verbatim", "sequenceNumber"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_duplicate_keys_are_read_last_wins_or_refused(
    arena: Arena, route_name: str, key: str, hostile: str
) -> None:
    """A duplicated member: either a 400, or the state stored is the one a last-wins
    parser (Go's encoding/json, the CLI) reads from the same body."""
    route = ROUTE[route_name]
    spoiled_value: Any = (
        "not-a-state" if key != "deployment" else h.deployment_doc([h.resource("duplicate", 9)])
    )
    if key == "untypedDeployment":
        spoiled_value = h.untyped([h.resource("duplicate", 9)])
    mutation = Mutation(
        f"duplicate-{hostile}", f"duplicate-{key}-other-{hostile}", (key,), spoiled_value
    )
    result = await arena.probe(
        ProbeSpec(route, route.target, "update-own" if route.auth == "update" else "user", mutation)
    )
    problems = []
    if result.answer.accepted:
        assert result.prepared.body.data is not None
        sent = json.loads(result.prepared.body.data)  # the standard library: last wins
        before = arena.before
        assert before is not None
        stored = json.loads(before.exports["B" if route.auth == "update" else "C"])
        if route_name == "checkpoint_verbatim":
            expected = sent["untypedDeployment"]
        elif route_name == "checkpoint":
            expected = {"version": sent["version"], "deployment": sent["deployment"]}
        else:
            expected = sent
        if stored != expected:
            problems.append(f"accepted, but stored {stored!r:.300} instead of {expected!r:.300}")
    elif result.answer.status != 400:
        problems.append(
            f"{result.spec.describe()}: expected 2xx or 400, got {result.answer.show()}"
        )
    arena.assert_clean(problems)


@pytest_twisted.ensureDeferred
async def test_byte_order_mark_is_a_400(arena: Arena) -> None:
    specs = [
        ProbeSpec(route, route.target, correct_auth(route), Mutation("bom", "bom"))
        for route in READS_BODY
    ]
    await expect_all(arena, specs, (400,))


@pytest_twisted.ensureDeferred
async def test_trailing_garbage_is_a_400(arena: Arena) -> None:
    specs = [
        ProbeSpec(
            route,
            route.target,
            correct_auth(route),
            Mutation("trailing", f"trailing-{i}", value=garbage),
        )
        for route in READS_BODY
        for i, garbage in enumerate([b" x", b"{}", b"\x00", b"]"])
    ]
    await expect_all(arena, specs, (400,))


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_is_a_400(arena: Arena) -> None:
    specs = [
        ProbeSpec(route, route.target, correct_auth(route), Mutation("invalid-utf8", "bad-utf8"))
        for route in READS_BODY
        if any(isinstance(v, str) for v in _leaves(h.valid_body(route.name, arena.context())))
    ]
    await expect_all(arena, specs, (400,))


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for child in value.values():
            yield from _leaves(child)
    elif isinstance(value, list):
        for child in value:
            yield from _leaves(child)
    else:
        yield value


WRONG_TYPES: list[tuple[str, h.Path, Any]] = [
    ("create_stack", ("stackName",), 5),
    ("create_stack", ("tags",), ["x"]),
    ("create_stack", ("state",), "x"),
    ("rename", ("newName",), ["x"]),
    ("tags", ("team",), 5),
    ("import", ("version",), "3"),
    ("import", ("deployment",), "x"),
    ("import", ("deployment", "resources"), {}),
    ("encrypt", ("plaintext",), 5),
    ("decrypt", ("ciphertext",), None),
    ("batch_encrypt", ("plaintexts",), "x"),
    ("batch_decrypt", ("ciphertexts",), [1]),
    ("create_update", ("options",), "x"),
    ("create_update", ("config",), ["x"]),
    ("create_update", ("metadata",), 1),
    ("start_update", ("tags",), ["x"]),
    ("renew_lease", ("duration",), "300"),
    ("renew_lease", ("duration",), True),
    ("checkpoint", ("version",), "3"),
    ("checkpoint", ("deployment",), []),
    ("checkpoint_verbatim", ("untypedDeployment",), []),
    ("checkpoint_verbatim", ("sequenceNumber",), 1.5),
    ("checkpoint_delta", ("deploymentDelta",), {}),
    ("checkpoint_delta", ("checkpointHash",), 5),
    ("journal_entries", ("entries",), {}),
    ("journal_entries", ("entries", 0, "kind"), "0"),
    ("events_batch", ("events",), {}),
    ("events_batch", ("events", 0, "sequence"), "1"),
    ("events_batch", ("events", 0), 5),
    ("event", ("sequence",), 1.5),
    ("complete", ("status",), 1),
]


@pytest_twisted.ensureDeferred
async def test_wrongly_typed_fields_are_a_400(arena: Arena) -> None:
    specs = [
        ProbeSpec(
            ROUTE[name],
            ROUTE[name].target,
            correct_auth(ROUTE[name]),
            Mutation("replace", f"wrong-type-{type(value).__name__}", path, value),
        )
        for name, path, value in WRONG_TYPES
    ]
    await expect_all(arena, specs, (400,))


async def refused_without_error(arena: Arena, specs: list[ProbeSpec]) -> None:
    """Each is refused with a 4xx, or a redirect (werkzeug merges "//" and answers 308)."""
    wrong = []
    for spec in specs:
        result = await arena.probe(spec, observe=False)
        status = result.answer.status
        if status is None or not 300 <= status < 500:
            wrong.append(f"{spec.describe()}: expected a 3xx or 4xx, got {result.answer.show()}")
    await arena.check_unchanged(f"the refused requests of this test ({len(specs)} sent)")
    arena.assert_clean(wrong)


PATH_CASES = [
    (label, placeholder, route)
    for label in sorted(set(h.ODD_SEGMENTS) - {"invalid-utf8", "overlong-utf8"})
    for placeholder, route in (
        ("stack", "get_stack"),
        ("project", "import"),
        ("update", "complete"),
        ("kind", "update_status"),
        ("org", "create_stack"),
    )
]


@pytest.mark.parametrize("placeholder", ["stack", "project", "update", "kind", "org"])
@pytest_twisted.ensureDeferred
async def test_odd_path_segments_are_refused(arena: Arena, placeholder: str) -> None:
    specs = [
        ProbeSpec(
            ROUTE[route],
            ROUTE[route].target,
            correct_auth(ROUTE[route]),
            path_twist=h.PathTwist(placeholder, label, h.ODD_SEGMENTS[label]),
        )
        for label, where, route in PATH_CASES
        if where == placeholder
    ]
    await refused_without_error(arena, specs)


@pytest.mark.parametrize("segment", ["invalid-utf8", "overlong-utf8"])
@pytest_twisted.ensureDeferred
async def test_non_utf8_paths_are_refused_without_a_traceback(arena: Arena, segment: str) -> None:
    specs = [
        ProbeSpec(
            ROUTE["get_stack"],
            "C",
            "user",
            path_twist=h.PathTwist("stack", segment, h.ODD_SEGMENTS[segment]),
        ),
        ProbeSpec(
            ROUTE["complete"],
            "U2",
            "update-own",
            path_twist=h.PathTwist("update", segment, h.ODD_SEGMENTS[segment]),
        ),
    ]
    await refused_without_error(arena, specs)


@pytest_twisted.ensureDeferred
async def test_request_lines_and_headers_over_twisted_limits_do_not_hurt(arena: Arena) -> None:
    """Twisted may drop these connections; the daemon must keep serving either way."""
    w = arena.world
    assert w is not None
    wrong = []
    for label, path, auth in (
        ("long path", f"/api/stacks/{ORG}/{PROJECT}/" + "n" * 20_000, f"token {TOKEN}"),
        ("long token", "/api/user", "token " + "x" * 20_000),
    ):
        reply = await arena.send("probe", label, "GET", path, None, auth, tolerate_drop=True)
        if reply.status is not None and not 400 <= reply.status < 500:
            wrong.append(f"{label}: {reply.show()}")
    reply = await arena.send("check", "still serving", "GET", "/api/user", None, f"token {TOKEN}")
    if reply.status != 200:
        wrong.append(f"afterwards GET /api/user: {reply.show()}")
    arena.assert_clean(wrong)


# -- the campaign ---------------------------------------------------------------------------
#
# Last in the file on purpose: its daemon lives until the module ends, and anything it logs
# (a timer failing every second, say) must not land in the regression tests' log checks.


@pytest_twisted.async_yield_fixture(scope="module")
async def hostile_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    async with serve(tmp_path_factory.mktemp("hostile-daemon"), **SERVER_OPTIONS) as server:
        yield server


@dataclass
class Campaign:
    arena: Arena
    summary_path: Path
    summary: dict[str, Any] = field(default_factory=dict)


def explore(arena: Arena, name: str, strategy: st.SearchStrategy[ProbeSpec]) -> None:
    @settings(EXPLORATION_SETTINGS, max_examples=EXAMPLES[name])
    @given(spec=strategy)
    def exploration(spec: ProbeSpec) -> None:
        arena.run(spec)

    exploration()


@pytest.fixture(scope="module")
def campaign(
    hostile_server: Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Campaign]:
    log = LogCapture()
    globalLogPublisher.addObserver(log)
    try:
        arena = Arena(hostile_server, log)
        started = time.monotonic()
        pytest_twisted.blockon(Deferred.fromCoroutine(arena.start()))
        for spec in h.sweep_specs():
            arena.run(spec)
        explore(arena, "credentials", h.probe_specs(mutate=False, twist_paths=False))
        explore(arena, "bodies", h.probe_specs(routes=h.BODY_ROUTES, auths=(), twist_paths=False))
        explore(arena, "paths", h.probe_specs(mutate=False, auths=()))
        explore(arena, "mixed", h.probe_specs())
        pytest_twisted.blockon(Deferred.fromCoroutine(arena.close()))
        log.active = False
        path = tmp_path_factory.mktemp("hostile") / "summary.json"
        summary = arena.summary(time.monotonic() - started)
        path.write_text(json.dumps(summary, indent=1))
        yield Campaign(arena, path, summary)
    finally:
        globalLogPublisher.removeObserver(log)


def test_no_server_errors(campaign: Campaign) -> None:
    errors = campaign.arena.of_kind("server-error")
    if errors:
        causes = campaign.arena.of_kind("reads-broken-after")
        context = ""
        if causes:
            context = (
                "\nRequests right after which reads that used to work started failing "
                f"(likely causes of the failures above):\n{report(causes)}"
            )
        pytest.fail(
            f"{campaign.summary['server_errors']} requests answered 5xx or not at all "
            f"(of {campaign.arena.requests}):\n{report(errors)}{context}",
            pytrace=False,
        )


def test_no_tracebacks_logged(campaign: Campaign) -> None:
    problems = campaign.arena.log.problems
    if problems:
        pytest.fail(report([], problems), pytrace=False)


def test_refused_requests_change_nothing(campaign: Campaign) -> None:
    changed = campaign.arena.of_kind("refused-but-changed")
    if changed:
        pytest.fail(report(changed), pytrace=False)


def test_wrong_credentials_are_never_accepted(campaign: Campaign) -> None:
    accepted = campaign.arena.of_kind("wrong-credentials-accepted")
    if accepted:
        pytest.fail(report(accepted), pytrace=False)


def test_accepted_states_stay_strict_json(campaign: Campaign) -> None:
    unreadable = campaign.arena.of_kind("unreadable-state")
    if unreadable:
        pytest.fail(report(unreadable), pytrace=False)


@pytest_twisted.ensureDeferred
async def test_honest_update_after_hostile_traffic(campaign: Campaign) -> None:
    """After the whole campaign, on the same daemon, a normal update works end to end."""
    server = campaign.arena.server
    name = "honest"
    base = f"/api/stacks/{ORG}/{PROJECT}/{name}"
    steps: list[str] = []

    async def step(what: str, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        reply = await server.call(method, path, body, **kw)
        steps.append(f"{what}: {method} {path} -> {reply.code} {reply.body[:300]!r}")
        assert 200 <= reply.code < 300, "\n".join(steps)
        return reply.json() if reply.body else None

    await step("create stack", "POST", f"/api/stacks/{ORG}/{PROJECT}", {"stackName": name})
    created = await step(
        "create update",
        "POST",
        f"{base}/update",
        {
            "name": PROJECT,
            "runtime": "yaml",
            "options": {"dryRun": False},
            "metadata": {"message": "honest"},
        },
    )
    update = created["updateID"]
    started = await step("start", "POST", f"{base}/update/{update}", {})
    auth = f"update-token {started['token']}"
    resources = [h.resource("honest-one", 1), h.resource("honest-two", 2)]
    checkpoint = {"isInvalid": False, **h.untyped(resources)}
    await step("checkpoint", "PATCH", f"{base}/update/{update}/checkpoint", checkpoint, auth=auth)
    events = [
        {"sequence": 0, "timestamp": 1, "preludeEvent": {"config": {}}},
        {
            "sequence": 1,
            "timestamp": 2,
            "summaryEvent": {"resourceChanges": {"create": 2}, "result": "succeeded"},
        },
    ]
    await step(
        "events", "POST", f"{base}/update/{update}/events/batch", {"events": events}, auth=auth
    )
    await step(
        "complete",
        "POST",
        f"{base}/update/{update}/complete",
        {"status": "succeeded"},
        auth=auth,
    )
    exported = await step("export", "GET", f"{base}/export")
    assert exported["deployment"]["resources"] == resources, "\n".join(steps)
    history = await step("history", "GET", f"{base}/updates")
    [info] = history["updates"]
    assert (info["updateID"], info["result"], info["kind"]) == (update, "succeeded", "update")
    got = await step("events", "GET", f"{base}/update/{update}/events")
    assert got["events"] == events, "\n".join(steps)


def test_campaign_summary(campaign: Campaign, request: pytest.FixtureRequest) -> None:
    """Last: prints the counts (past pytest's capture) and checks what was covered."""
    summary = json.loads(campaign.summary_path.read_text())
    line = (
        f"hostile campaign: {summary['requests']} requests ({summary['probes']} probes, "
        f"{summary['accepted']} accepted, {summary['refused']} refused) in "
        f"{summary['seconds']}s; 5xx or no answer: {summary['server_errors']} "
        f"({summary['probe_server_errors']} on probes); refused but changed: "
        f"{summary['refused_but_changed']}; wrong credentials accepted: "
        f"{summary['wrong_credentials_accepted']}; unreadable states: "
        f"{summary['unreadable_states']}; log problems: {summary['log_problems']}; "
        f"summary: {campaign.summary_path}"
    )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print(f"\n{line}")
    else:
        print(line)
    assert summary["requests"] == campaign.arena.requests
    assert summary["probes"] >= len(h.sweep_specs()) + 100
    assert summary["requests"] > summary["probes"] * 10  # a snapshot after every probe
    coverage = summary["coverage"]
    missing = []
    sent_auth: set[str] = set()
    sent_mutations: set[str] = set()
    sent_segments: set[str] = set()
    for route in h.ROUTES:
        seen = coverage.get(route.name, {})
        sent_auth.update(seen.get("auth", []))
        sent_mutations.update(seen.get("mutation", []))
        sent_segments.update(seen.get("path", []))
        wrong = "update-wrong" if route.auth == "update" else "user-wrong"
        for auth in (h.correct_auth(route), "none", wrong, "update-other"):
            if auth not in seen.get("auth", []):
                missing.append(f"{route.name}: credentials {auth}")
        if route.has_body:
            for group, mutations in h.mutation_groups(route.name).items():
                if not {m.label for m in mutations} & set(seen.get("mutation", [])):
                    missing.append(f"{route.name}: no {group} body")
    missing += [f"credentials {a} never sent" for a in set(h.AUTH_KINDS) - sent_auth]
    every_label = {m.label for r in h.BODY_ROUTES for m in h.fixed_mutations(r.name)}
    missing += [f"body {m} never sent" for m in sorted(every_label - sent_mutations)]
    missing += [f"segment {s} never sent" for s in sorted(set(h.ODD_SEGMENTS) - sent_segments)]
    assert not missing, missing
    assert not summary["setup_problems"], summary["setup_problems"]
