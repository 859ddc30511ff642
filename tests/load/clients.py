"""Clients for the load test: honest CLI-like updates, a hostile neighbour, a prober, an RSS
sampler. Plain threads and http.client against 127.0.0.1; every loop is bounded in count and
in time.

Everything expensive to build (journal batches, gzip bombs, junk) is built before the load
starts, so that the test process spends the load sending bytes, not compressing them, and the
prober's latencies are the daemon's, not this process's.
"""

from __future__ import annotations

import gzip
import http.client
import json
import math
import os
import random
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"

# What the CLI 3.259.0 sends with every request (reference §1.1).
CLI_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/vnd.pulumi+9",
    "Accept-Encoding": "gzip",
    "User-Agent": "pulumi-cli/1 (3.259.0; linux; cmd=up)",
}
ITEM_TYPE = "test:index:Item"


# --------------------------------------------------------------------------------------------
# HTTP


@dataclass(frozen=True)
class Reply:
    """One answer; status 0 means there was none (refused, reset, closed or timed out)."""

    status: int
    body: bytes
    headers: Mapping[str, str]
    seconds: float
    error: str = ""

    def json(self) -> Any:
        return json.loads(self.body)

    def brief(self) -> str:
        if self.status == 0:
            return f"no answer ({self.error})"
        return f"{self.status} {self.body[:300]!r}"


class Connection:
    """An HTTP/1.1 connection to the daemon, kept alive like the CLI's, reopened after errors.

    With keep_alive=False every request gets a fresh connection (the hostile client)."""

    def __init__(self, port: int, timeout: float, keep_alive: bool = True) -> None:
        self.port = port
        self.timeout = timeout
        self.keep_alive = keep_alive
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        if self._conn is None or not self.keep_alive:
            self.close()
            self._conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
        all_headers = dict(headers or {})
        if not self.keep_alive:
            all_headers["Connection"] = "close"
        started = time.perf_counter()
        try:
            self._conn.request(method, path, body=body, headers=all_headers)
            response = self._conn.getresponse()
            raw = response.read()
            status, reply_headers = (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
            )
            if response.will_close or not self.keep_alive:
                self.close()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return Reply(0, b"", {}, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
        elapsed = time.perf_counter() - started
        if reply_headers.get("content-encoding", "").lower() in ("gzip", "x-gzip"):
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as exc:
                return Reply(status, raw, reply_headers, elapsed, f"bad gzip answer: {exc}")
        return Reply(status, raw, reply_headers, elapsed)


def gz(value: Any) -> bytes:
    return gzip.compress(json.dumps(value, separators=(",", ":")).encode(), 6)


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------------
# Honest clients: one complete journaling update each, the way the CLI 3.259.0 runs it.


@dataclass(frozen=True)
class Ticket:
    """A running update, as the hostile client may learn (steal) it."""

    base: str  # /api/stacks/{org}/{project}/{stack}
    update: str  # {base}/update/{id}
    token: str


class Tickets:
    """Running honest updates, shared with the hostile client (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Ticket] = []

    def add(self, ticket: Ticket) -> None:
        with self._lock:
            self._items.append(ticket)

    def snapshot(self) -> list[Ticket]:
        with self._lock:
            return list(self._items)


@dataclass
class Plan:
    """Everything one honest client will send, built before the load starts."""

    org: str
    project: str
    stack: str
    resources: list[dict[str, Any]]
    journal_batches: list[bytes]  # gzipped {"entries": [...]}
    event_batches: list[bytes]  # gzipped {"events": [...]}, one after each journal batch
    event_count: int

    @property
    def base(self) -> str:
        return f"/api/stacks/{self.org}/{self.project}/{self.stack}"


def make_plan(
    org: str,
    project: str,
    stack: str,
    daemon_url: str,
    resource_count: int,
    batch_count: int,
    payload_chars: int,
    rng: random.Random,
) -> Plan:
    """A journaling update creating RESOURCE_COUNT resources of about 2*PAYLOAD_CHARS bytes of
    inputs and outputs, sent as BATCH_COUNT journal batches (each followed by an events batch).
    """
    resources: list[dict[str, Any]] = []
    for i in range(resource_count):
        urn = f"urn:pulumi:{stack}::{project}::{ITEM_TYPE}::r{i}"
        payload = rng.randbytes(payload_chars // 2).hex()
        resources.append(
            {
                "urn": urn,
                "custom": True,
                "id": f"{stack}-r{i}-{rng.randbytes(4).hex()}",
                "type": ITEM_TYPE,
                "inputs": {"name": f"r{i}", "index": i, "payload": payload},
                "outputs": {"name": f"r{i}", "index": i, "payload": payload[::-1], "ok": True},
            }
        )
    # The CLI's first entry: the secrets manager (kind 6, operation 0).
    entries: list[dict[str, Any]] = [
        {
            "version": 1,
            "kind": 6,
            "sequenceID": 1,
            "operationID": 0,
            "removeOld": None,
            "removeNew": None,
            "secretsProvider": {
                "type": "service",
                "state": {"url": daemon_url, "owner": org, "project": project, "stack": stack},
            },
        }
    ]
    for i, res in enumerate(resources):
        op = i + 1
        head = {"urn": res["urn"], "custom": True, "type": ITEM_TYPE}
        entries.append(
            {
                "version": 1,
                "kind": 0,
                "sequenceID": len(entries) + 1,
                "operationID": op,
                "removeOld": None,
                "removeNew": None,
                "operation": {"resource": head, "type": "creating"},
            }
        )
        entries.append(
            {
                "version": 1,
                "kind": 1,
                "sequenceID": len(entries) + 1,
                "operationID": op,
                "removeOld": None,
                "removeNew": None,
                "state": res,
            }
        )
    per_batch = math.ceil(len(entries) / batch_count)
    journal_batches = [
        gz({"entries": entries[i : i + per_batch]}) for i in range(0, len(entries), per_batch)
    ]
    # Engine events: a prelude, a diagnostic per resource, a summary; sequences from 0.
    now = int(time.time())
    events: list[dict[str, Any]] = [
        {"sequence": 0, "timestamp": now, "preludeEvent": {"config": {}}}
    ]
    for res in resources:
        events.append(
            {
                "sequence": len(events),
                "timestamp": now,
                "diagnosticEvent": {
                    "urn": res["urn"],
                    "prefix": "",
                    "message": f"created {res['urn']}\n",
                    "color": "never",
                    "severity": "info",
                },
            }
        )
    events.append(
        {
            "sequence": len(events),
            "timestamp": now,
            "summaryEvent": {
                "maybeCorrupt": False,
                "durationSeconds": 1,
                "resourceChanges": {"create": resource_count},
                "PolicyPacks": {},
                "isPreview": False,
                "result": "succeeded",
            },
        }
    )
    per_events = math.ceil(len(events) / len(journal_batches))
    event_batches = [
        gz({"events": events[i : i + per_events]}) for i in range(0, len(events), per_events)
    ]
    return Plan(
        org, project, stack, resources, journal_batches, event_batches, event_count=len(events)
    )


@dataclass
class HonestResult:
    stack: str
    error: str = ""
    retries: int = 0
    requests: int = 0
    seconds: float = 0.0
    update_id: str = ""
    export: Any = None
    final_status: str = ""
    events_seen: int = 0


class _Failed(Exception):
    pass


class HonestClient:
    """Runs one plan; never raises: whatever went wrong is in the result's `error`."""

    # The CLI's retry policy (reference §1.4): up to 4 attempts, waiting 1, 2, 4 s.
    RETRY_WAITS = (1.0, 2.0, 4.0)

    def __init__(
        self, port: int, api_token: str, plan: Plan, tickets: Tickets, deadline: float
    ) -> None:
        self.plan = plan
        self.api_token = api_token
        self.tickets = tickets
        self.deadline = deadline
        self.conn = Connection(port, timeout=30)
        self.result = HonestResult(plan.stack)

    def _call(
        self,
        what: str,
        method: str,
        path: str,
        body: bytes | None,
        auth: str,
        expect: Sequence[int],
        retried: bool,
        gzipped: bool = False,
    ) -> Reply:
        headers = dict(CLI_HEADERS, Authorization=auth)
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        for attempt in range(len(self.RETRY_WAITS) + 1):
            if time.monotonic() > self.deadline:
                raise _Failed(f"{what}: out of time")
            self.result.requests += 1
            reply = self.conn.request(method, path, body, headers)
            if reply.status in expect:
                return reply
            transient = reply.status == 0 or reply.status == 429 or reply.status >= 500
            if not (retried and transient) or attempt == len(self.RETRY_WAITS):
                raise _Failed(f"{what}: {method} {path} -> {reply.brief()}")
            wait = self.RETRY_WAITS[attempt]
            if reply.status == 429:
                try:
                    wait = min(30.0, float(reply.headers.get("retry-after", "0"))) + wait
                except ValueError:
                    pass
            self.result.retries += 1
            time.sleep(wait)
        raise AssertionError("unreachable")

    def run(self, start: threading.Barrier, think: float) -> HonestResult:
        started = time.monotonic()
        try:
            start.wait(timeout=60)
            self._run(think)
        except _Failed as exc:
            self.result.error = str(exc)
        except threading.BrokenBarrierError:
            self.result.error = "the start barrier broke"
        finally:
            self.conn.close()
            self.result.seconds = time.monotonic() - started
        return self.result

    def _run(self, think: float) -> None:
        plan, api = self.plan, f"token {self.api_token}"
        base = plan.base
        self._call(
            "create stack",
            "POST",
            f"/api/stacks/{plan.org}/{plan.project}",
            dumps({"stackName": plan.stack, "tags": {"pulumi:project": plan.project}}),
            api,
            (200,),
            retried=False,
        )
        create = {
            "name": plan.project,
            "runtime": "yaml",
            "main": "",
            "description": "",
            "config": {},
            "metadata": {"message": "load", "environment": {"exec.kind": "cli"}},
            "options": {},
        }
        reply = self._call(
            "create update", "POST", f"{base}/update", dumps(create), api, (200,), retried=False
        )
        update_id = str(reply.json()["updateID"])
        self.result.update_id = update_id
        update = f"{base}/update/{update_id}"
        reply = self._call(
            "start update",
            "POST",
            update,
            dumps({"tags": {"pulumi:project": plan.project}, "journalVersion": 1}),
            api,
            (200,),
            retried=False,
        )
        started = reply.json()
        token = started.get("token")
        if not isinstance(token, str) or not token or started.get("journalVersion") != 1:
            raise _Failed(f"start update: answer without a token or journalVersion 1: {started}")
        self.tickets.add(Ticket(base, update, token))
        # What the CLI reads before the engine runs.
        self._call("read base state", "GET", f"{base}/export", None, api, (200,), retried=True)
        self._call("read stack", "GET", base, None, api, (200,), retried=True)
        lease = f"update-token {token}"
        for i, batch in enumerate(plan.journal_batches):
            if i and think:
                time.sleep(think)
            self._call(
                f"journal batch {i + 1}/{len(plan.journal_batches)}",
                "PATCH",
                f"{update}/journalentries",
                batch,
                lease,
                (200, 204),
                retried=True,
                gzipped=True,
            )
            if i < len(plan.event_batches):
                self._call(
                    f"events batch {i + 1}",
                    "POST",
                    f"{update}/events/batch",
                    plan.event_batches[i],
                    lease,
                    (200, 204),
                    retried=True,
                    gzipped=True,
                )
        for j in range(len(plan.journal_batches), len(plan.event_batches)):
            self._call(
                f"events batch {j + 1}",
                "POST",
                f"{update}/events/batch",
                plan.event_batches[j],
                lease,
                (200, 204),
                retried=True,
                gzipped=True,
            )
        self._call(
            "complete",
            "POST",
            f"{update}/complete",
            dumps({"status": "succeeded"}),
            lease,
            (200, 204),
            retried=True,
        )
        # Afterwards: the update's status, its events and the stack's state.
        reply = self._call("update status", "GET", update, None, api, (200,), retried=True)
        self.result.final_status = str(reply.json().get("status"))
        continuation: str | None = None
        for _page in range(10):
            query = f"?continuationToken={continuation}" if continuation else ""
            reply = self._call(
                "read events", "GET", f"{update}/events{query}", None, api, (200,), retried=True
            )
            page = reply.json()
            self.result.events_seen += len(page.get("events") or [])
            continuation = page.get("continuationToken")
            if not continuation:
                break
        reply = self._call("export", "GET", f"{base}/export", None, api, (200,), retried=True)
        self.result.export = reply.json()


# --------------------------------------------------------------------------------------------
# The hostile neighbour


def gzip_bomb(zeros: int) -> bytes:
    """gzip of ZEROS zero bytes (about a thousandth of that), built without holding them."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 20)
    parts = []
    left = zeros
    while left > 0:
        parts.append(compressor.compress(chunk[: min(left, len(chunk))]))
        left -= len(chunk)
    parts.append(compressor.flush())
    return b"".join(parts)


def nested_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@dataclass(frozen=True)
class Attack:
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes | None = None


@dataclass
class HostileStats:
    sent: int = 0
    no_answer: int = 0
    by_kind: dict[str, Counter[int]] = field(default_factory=dict)
    slowest: dict[str, float] = field(default_factory=dict)  # seconds, per kind
    # (kind, method, path, what came back) of every 5xx / 2xx answer, the first few of each
    server_errors: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    setup: str = ""
    seconds: float = 0.0

    @property
    def five_xx(self) -> int:
        return sum(n for c in self.by_kind.values() for s, n in c.items() if s >= 500)

    @property
    def two_xx(self) -> int:
        return sum(n for c in self.by_kind.values() for s, n in c.items() if 200 <= s < 300)

    def table(self) -> dict[str, dict[str, Any]]:
        """Per kind: how many answers of each status ("0": none), and the slowest in ms."""
        return {
            kind: {
                **{str(status): n for status, n in sorted(c.items())},
                "slowest_ms": round(self.slowest.get(kind, 0.0) * 1000, 1),
            }
            for kind, c in sorted(self.by_kind.items())
        }


class Hostile:
    """One client hammering the daemon with requests that must all be refused (4xx).

    It holds the API token too: in a one-user daemon the neighbour is a buggy or malicious
    program using the same login, so it gets its own stack and update (own update token) to
    reach the parsers, and it learns the honest updates' tokens (from `tickets`) to try them on
    each other's updates. It never does what that token legitimately allows on honest stacks
    (cancel, delete, import...): only requests that a correct daemon must reject.

    Gzip bombs go only to places where the credential is missing or not valid for the target:
    a bomb with a valid credential is within the configured --max-body-size by design.
    """

    def __init__(
        self,
        port: int,
        api_token: str,
        org: str,
        project: str,
        tickets: Tickets,
        rng: random.Random,
        junk_bytes: int = 5 * 1024 * 1024,
        bomb_zeros: int = 200 * 1024 * 1024,
        nesting: int = 100_000,
    ) -> None:
        self.port = port
        self.api_token = api_token
        self.org = org
        self.project = project
        self.tickets = tickets
        self.rng = rng
        self.stats = HostileStats()
        self.own: Ticket | None = None
        self.junk = rng.randbytes(junk_bytes)
        self.bomb = gzip_bomb(bomb_zeros)
        self.deep = nested_json(nesting)
        self.deep_gz = gzip.compress(self.deep, 6)
        self.deep_entries_gz = gzip.compress(b'{"entries":' + self.deep + b"}", 6)
        self.deep_events_gz = gzip.compress(b'{"events":' + self.deep + b"}", 6)
        self.kinds: list[tuple[str, Callable[[], Attack | None]]] = self._catalogue()

    # -- setup: the neighbour's own journaling update --------------------------------------

    def set_up(self) -> None:
        conn = Connection(self.port, timeout=30)
        api = dict(CLI_HEADERS, Authorization=f"token {self.api_token}")
        base = f"/api/stacks/{self.org}/{self.project}/neighbour"
        try:
            steps = [
                ("POST", f"/api/stacks/{self.org}/{self.project}", {"stackName": "neighbour"}),
                ("POST", f"{base}/update", {"config": {}, "metadata": {}, "options": {}}),
            ]
            for method, path, body in steps:
                reply = conn.request(method, path, dumps(body), api)
                if reply.status != 200:
                    self.stats.setup = f"{method} {path} -> {reply.brief()}"
                    return
            update = f"{base}/update/{reply.json()['updateID']}"
            reply = conn.request("POST", update, dumps({"journalVersion": 1}), api)
            if reply.status != 200:
                self.stats.setup = f"POST {update} -> {reply.brief()}"
                return
            self.own = Ticket(base, update, str(reply.json()["token"]))
        finally:
            conn.close()

    # -- the requests ----------------------------------------------------------------------

    def _headers(self, auth: str | None, gzipped: bool = False) -> dict[str, str]:
        headers = dict(CLI_HEADERS)
        if auth is not None:
            headers["Authorization"] = auth
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        return headers

    def _wrong(self) -> str:
        return "pul-" + self.rng.randbytes(20).hex()

    def _two_honest(self) -> tuple[Ticket, Ticket] | None:
        running = self.tickets.snapshot()
        if len(running) < 2:
            return None
        victim, thief = self.rng.sample(running, 2)
        return victim, thief

    def _victim(self) -> Ticket | None:
        running = self.tickets.snapshot()
        return self.rng.choice(running) if running else None

    def _catalogue(self) -> list[tuple[str, Callable[[], Attack | None]]]:
        api = f"token {self.api_token}"
        stacks = f"/api/stacks/{self.org}/{self.project}"

        def entry(**fields: Any) -> dict[str, Any]:
            base = {
                "version": 1,
                "kind": 0,
                "sequenceID": 1,
                "operationID": 1,
                "removeOld": None,
                "removeNew": None,
            }
            base.update(fields)
            return base

        evil_state = {
            "urn": f"urn:pulumi:x::{self.project}::{ITEM_TYPE}::evil",
            "custom": True,
            "id": "evil",
            "type": ITEM_TYPE,
        }
        # Entries that would add a resource to a victim's update if they were accepted.
        evil_batch = gz(
            {
                "entries": [
                    entry(sequenceID=10_001, operationID=10_001),
                    entry(kind=1, sequenceID=10_002, operationID=10_001, state=evil_state),
                ]
            }
        )
        evil_events = gz(
            {
                "events": [
                    {
                        "sequence": 10_000,
                        "timestamp": 0,
                        "diagnosticEvent": {
                            "message": "evil",
                            "color": "never",
                            "severity": "info",
                        },
                    }
                ]
            }
        )

        def on_victim(
            suffix: str, method: str, body: bytes | None, gzipped: bool, auth: str | None
        ) -> Callable[[], Attack | None]:
            def build() -> Attack | None:
                victim = self._victim()
                if victim is None:
                    return None
                return Attack(method, victim.update + suffix, self._headers(auth, gzipped), body)

            return build

        def wrong_update_token(
            suffix: str, method: str, body: bytes | None, gzipped: bool
        ) -> Callable[[], Attack | None]:
            def build() -> Attack | None:
                victim = self._victim()
                if victim is None:
                    return None
                headers = self._headers(f"update-token {self._wrong()}", gzipped)
                return Attack(method, victim.update + suffix, headers, body)

            return build

        def stolen(
            suffix: str, method: str, body: bytes | None, gzipped: bool
        ) -> Callable[[], Attack | None]:
            """Honest update B's token on honest update A."""

            def build() -> Attack | None:
                pair = self._two_honest()
                if pair is None:
                    return None
                victim, thief = pair
                headers = self._headers(f"update-token {thief.token}", gzipped)
                return Attack(method, victim.update + suffix, headers, body)

            return build

        def own(
            suffix: str, method: str, body: bytes, gzipped: bool
        ) -> Callable[[], Attack | None]:
            """The neighbour's own update with its own valid token: malformed payloads."""

            def build() -> Attack | None:
                if self.own is None:
                    return None
                headers = self._headers(f"update-token {self.own.token}", gzipped)
                return Attack(method, self.own.update + suffix, headers, body)

            return build

        def fixed(
            method: str,
            path: str,
            auth: str | None,
            body: bytes | None = None,
            gzipped: bool = False,
        ) -> Callable[[], Attack | None]:
            def build() -> Attack | None:
                return Attack(method, path, self._headers(auth, gzipped), body)

            return build

        def victim_path(
            suffix: str, method: str, auth: Callable[[Ticket], str | None]
        ) -> Callable[[], Attack | None]:
            def build() -> Attack | None:
                victim = self._victim()
                if victim is None:
                    return None
                return Attack(method, victim.base + suffix, self._headers(auth(victim)))

            return build

        nan_stack = b'{"stackName": NaN, "tags": {"a": Infinity}}'
        nan_entries = gzip.compress(
            b'{"entries":[{"version":1,"kind":0,"sequenceID":Infinity,"operationID":NaN,'
            b'"removeOld":null,"removeNew":null}]}'
        )
        nan_events = gzip.compress(
            b'{"events":[{"sequence":NaN,"timestamp":Infinity,'
            b'"diagnosticEvent":{"message":"x","color":"never","severity":"info"}}]}'
        )
        huge = 10**20
        huge_seq_entries = gz({"entries": [entry(sequenceID=huge)]})
        huge_op_entries = gz({"entries": [entry(sequenceID=2, operationID=huge, removeOld=huge)]})
        huge_events = gz(
            {
                "events": [
                    {
                        "sequence": huge,
                        "timestamp": huge,
                        "diagnosticEvent": {"message": "x", "color": "never", "severity": "info"},
                    }
                ]
            }
        )
        # The first integer an int64 cannot hold (Go's int64 is the wire type of `sequence`):
        # parsed as an int, unlike 10**20, so it reaches the event store.
        int64_overflow_events = gz(
            {
                "events": [
                    {
                        "sequence": 2**63,
                        "timestamp": 0,
                        "diagnosticEvent": {"message": "x", "color": "never", "severity": "info"},
                    }
                ]
            }
        )
        junk_headers = {"Content-Type": "application/json"}

        kinds: list[tuple[str, Callable[[], Attack | None]]] = [
            # -- credentials
            ("no-token", fixed("GET", "/api/user", None)),
            ("wrong-token", fixed("GET", "/api/user", f"token {self._wrong()}")),
            ("wrong-scheme", fixed("GET", "/api/user", f"Bearer {self.api_token}")),
            (
                "update-token-as-api-token",
                victim_path("/export", "GET", lambda v: f"token {v.token}"),
            ),
            (
                "wrong-token-export",
                victim_path("/export", "GET", lambda v: f"token {self._wrong()}"),
            ),
            (
                "api-token-as-update-token",
                on_victim(
                    "/journalentries", "PATCH", evil_batch, True, f"update-token {self.api_token}"
                ),
            ),
            ("no-update-token", on_victim("/journalentries", "PATCH", evil_batch, True, None)),
            (
                "wrong-update-token",
                wrong_update_token("/journalentries", "PATCH", evil_batch, True),
            ),
            ("stolen-token-journal", stolen("/journalentries", "PATCH", evil_batch, True)),
            ("stolen-token-events", stolen("/events/batch", "POST", evil_events, True)),
            (
                "stolen-token-complete",
                stolen("/complete", "POST", dumps({"status": "failed"}), False),
            ),
            (
                "stolen-token-renew",
                stolen("/renew_lease", "POST", dumps({"token": "", "duration": 300}), False),
            ),
            # -- 5 MB of junk
            (
                "junk-no-token",
                lambda: Attack("POST", stacks, junk_headers, self.junk),
            ),
            (
                "junk-wrong-update-token",
                wrong_update_token("/journalentries", "PATCH", self.junk, False),
            ),
            ("junk-stolen-token-events", stolen("/events/batch", "POST", self.junk, False)),
            ("junk-authenticated", fixed("POST", stacks, api, self.junk)),
            # -- gzip bombs (200 MB of zeros)
            ("bomb-no-token", fixed("POST", stacks, None, self.bomb, True)),
            ("bomb-wrong-token", fixed("POST", stacks, f"token {self._wrong()}", self.bomb, True)),
            ("bomb-no-update-token", on_victim("/journalentries", "PATCH", self.bomb, True, None)),
            (
                "bomb-wrong-update-token",
                wrong_update_token("/journalentries", "PATCH", self.bomb, True),
            ),
            ("bomb-stolen-token-journal", stolen("/journalentries", "PATCH", self.bomb, True)),
            ("bomb-stolen-token-events", stolen("/events/batch", "POST", self.bomb, True)),
            ("bomb-stolen-token-complete", stolen("/complete", "POST", self.bomb, True)),
            # -- JSON nested 100,000 deep
            ("deep-create-stack", fixed("POST", stacks, api, self.deep)),
            ("deep-create-stack-gzip", fixed("POST", stacks, api, self.deep_gz, True)),
            ("deep-journal", own("/journalentries", "PATCH", self.deep_entries_gz, True)),
            ("deep-events", own("/events/batch", "POST", self.deep_events_gz, True)),
            ("deep-complete", own("/complete", "POST", self.deep, False)),
            # -- NaN / Infinity
            ("nan-create-stack", fixed("POST", stacks, api, nan_stack)),
            ("nan-journal", own("/journalentries", "PATCH", nan_entries, True)),
            ("nan-events", own("/events/batch", "POST", nan_events, True)),
            # -- numbers no int64 holds
            ("huge-sequence-journal", own("/journalentries", "PATCH", huge_seq_entries, True)),
            ("huge-operation-journal", own("/journalentries", "PATCH", huge_op_entries, True)),
            ("huge-sequence-events", own("/events/batch", "POST", huge_events, True)),
            (
                "int64-overflow-events",
                own("/events/batch", "POST", int64_overflow_events, True),
            ),
            (
                "huge-renew-duration",
                own("/renew_lease", "POST", dumps({"token": "", "duration": huge}), False),
            ),
            (
                "huge-export-version",
                fixed("GET", f"{stacks}/neighbour/export/{huge}", api),
            ),
            (
                "huge-events-continuation",
                on_victim(f"/events?continuationToken={huge}", "GET", None, False, api),
            ),
            # -- bad paths
            ("path-traversal", fixed("GET", f"{stacks}/../../../../etc/passwd", api)),
            ("path-encoded-traversal", fixed("GET", "/api/stacks/%2e%2e/%2e%2e/etc/passwd", api)),
            ("path-nul", fixed("GET", f"{stacks}/%00/export", api)),
            ("path-bad-utf8", fixed("GET", f"/api/stacks/{self.org}/%ff%fe/s/export", api)),
            ("path-bad-query", fixed("GET", "/api/user/stacks?organization=%ff%fe", api)),
            ("path-unknown-org", fixed("GET", f"/api/stacks/evil/{self.project}/s/export", api)),
            ("path-unknown-route", fixed("GET", "/api/nothing/here", api)),
            ("path-long", fixed("GET", "/api/" + "a/" * 4000, api)),
            ("path-too-long", fixed("GET", "/api/" + "b" * 70_000, api)),
            (
                "path-unknown-update",
                fixed(
                    "PATCH",
                    f"{stacks}/neighbour/update/00000000-0000-0000-0000-000000000000/journalentries",
                    f"update-token {self._wrong()}",
                    evil_batch,
                    True,
                ),
            ),
            ("method-not-allowed", fixed("DELETE", "/api/user", api)),
        ]
        return kinds

    # -- the loop --------------------------------------------------------------------------

    def run(self, stop: threading.Event, deadline: float, max_requests: int) -> HostileStats:
        started = time.monotonic()
        conn = Connection(self.port, timeout=30, keep_alive=False)
        index = 0
        misses = 0
        try:
            while (
                not stop.is_set() and time.monotonic() < deadline and self.stats.sent < max_requests
            ):
                kind, build = self.kinds[index % len(self.kinds)]
                index += 1
                attack = build()
                if attack is None:  # needs honest updates that are not running yet
                    misses += 1
                    if misses >= len(self.kinds):
                        misses = 0
                        stop.wait(0.01)
                    continue
                misses = 0
                reply = conn.request(attack.method, attack.path, attack.body, attack.headers)
                self._record(kind, attack, reply)
        finally:
            conn.close()
            self.stats.seconds = time.monotonic() - started
        return self.stats

    def _record(self, kind: str, attack: Attack, reply: Reply) -> None:
        stats = self.stats
        stats.sent += 1
        stats.by_kind.setdefault(kind, Counter())[reply.status] += 1
        stats.slowest[kind] = max(stats.slowest.get(kind, 0.0), reply.seconds)
        where = f"{kind}: {attack.method} {attack.path[:120]} -> {reply.brief()}"
        if reply.status == 0:
            stats.no_answer += 1
        elif reply.status >= 500 and len(stats.server_errors) < 50:
            stats.server_errors.append(where)
        elif 200 <= reply.status < 300 and len(stats.accepted) < 50:
            stats.accepted.append(where)


# --------------------------------------------------------------------------------------------
# Measuring


@dataclass
class ProbeStats:
    latencies: list[float] = field(default_factory=list)  # seconds; a failed probe is inf
    failures: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return math.inf
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def probe(
    port: int,
    api_token: str,
    stop: threading.Event,
    deadline: float,
    interval: float,
    max_probes: int,
) -> ProbeStats:
    """GET /api/user every INTERVAL seconds (missed ticks are skipped, not bunched)."""
    stats = ProbeStats()
    conn = Connection(port, timeout=5)
    headers = dict(CLI_HEADERS, Authorization=f"token {api_token}")
    tick = time.monotonic()
    try:
        while (
            not stop.is_set() and time.monotonic() < deadline and len(stats.latencies) < max_probes
        ):
            reply = conn.request("GET", "/api/user", None, headers)
            if reply.status == 200:
                stats.latencies.append(reply.seconds)
            else:
                stats.latencies.append(math.inf)
                if len(stats.failures) < 20:
                    stats.failures.append(reply.brief())
            now = time.monotonic()
            tick += interval
            if tick < now:
                tick = now + interval - ((now - tick) % interval)
            stop.wait(tick - now)
    finally:
        conn.close()
    return stats


def read_memory(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of PID in bytes, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024
    if "VmRSS" not in values:
        return None
    return values["VmRSS"], values.get("VmHWM", 0)


@dataclass
class MemoryStats:
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds, VmRSS bytes)
    hwm: int = 0

    @property
    def max_rss(self) -> int:
        return max((rss for _t, rss in self.samples), default=0)


def sample_memory(
    pid: int, stop: threading.Event, deadline: float, interval: float, max_samples: int
) -> MemoryStats:
    stats = MemoryStats()
    started = time.monotonic()
    while not stop.is_set() and time.monotonic() < deadline and len(stats.samples) < max_samples:
        memory = read_memory(pid)
        if memory is None:
            break
        stats.samples.append((time.monotonic() - started, memory[0]))
        stats.hwm = max(stats.hwm, memory[1])
        stop.wait(interval)
    return stats


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of PID so far (from /proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
