"""The audit trail: rows in the store (batched, retried), JSON lines to their own destination."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher

from pulumid.errors import ShuttingDown, Unavailable
from pulumid.ops.audit import AuditTrail
from pulumid.ops.logs import daemon_observer
from pulumid.storage.records import AuditRecord
from pulumid.storage.sqlite import SQLiteStore
from pulumid.threads import InlineRunner


class FlakyStore:
    """A store whose audit writes fail the first N times."""

    def __init__(self, store: SQLiteStore, failures: int) -> None:
        self.store = store
        self.failures = failures
        self.calls = 0

    def add_audit_events(self, events: list[AuditRecord]) -> Deferred[None]:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            return Deferred.fromCoroutine(_fail())
        return self.store.add_audit_events(events)


async def _fail() -> None:
    raise Unavailable("Service Unavailable: the disk is full")


def _done(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Exception):
        raise results[0]
    return results[0]


def test_rows_are_stored_and_a_failed_write_is_retried(tmp_path: Path) -> None:
    store = SQLiteStore.open(tmp_path / "db.sqlite", InlineRunner())
    clock = Clock()
    clock.advance(1_000)
    flaky = FlakyStore(store, failures=1)
    trail = AuditTrail(flaky, clock)  # type: ignore[arg-type]
    trail.record("acme", "alice", "stack.delete", "acme/web/dev", 204, "10.0.0.7")
    trail.record("acme", "bob", "access", "acme/web/dev", 403, "10.0.0.8")
    assert flaky.calls == 1  # failed: kept for the retry a second later
    clock.advance(1.0)
    _done(Deferred.fromCoroutine(trail.flush()))
    rows = _done(store.list_audit_events("acme", None, None, None, None, 0, 10))
    assert [(r.actor, r.action, r.status) for r in rows] == [
        ("bob", "access", 403),
        ("alice", "stack.delete", 204),
    ]
    assert rows[1].client_ip == "10.0.0.7" and rows[1].time == 1_000
    store.close()


class StoppedStore:
    """The storage threads have stopped: every write fails as it does during shutdown."""

    def __init__(self) -> None:
        self.calls = 0

    def add_audit_events(self, events: list[AuditRecord]) -> Deferred[None]:
        self.calls += 1
        return Deferred.fromCoroutine(_stopped())


async def _stopped() -> None:
    raise ShuttingDown("Service Unavailable: the daemon is shutting down")


def test_no_retry_once_the_daemon_is_stopping() -> None:
    # Retrying every second after the pools stopped would go on until the process exits
    # (in a test run: into every later test's log).
    clock = Clock()
    stopped = StoppedStore()
    trail = AuditTrail(stopped, clock)  # type: ignore[arg-type]
    trail.record("acme", "alice", "stack.delete", "acme/web/dev", 204, "10.0.0.7")
    _done(Deferred.fromCoroutine(trail.flush()))
    clock.advance(60.0)
    assert stopped.calls == 1 and not clock.getDelayedCalls()


def test_log_lines_by_type_and_destination(tmp_path: Path) -> None:
    """JSON lines with a log_type; audit (and access) lines also to files of their own."""
    store = SQLiteStore.open(tmp_path / "db.sqlite", InlineRunner())
    main, audit = tmp_path / "main.jsonl", tmp_path / "audit.jsonl"
    observer = daemon_observer("json", str(main), ["operational", "audit"], "", str(audit))
    publisher = LogPublisher(observer)
    import pulumid.ops.audit as audit_module

    original = audit_module.log.observer
    audit_module.log.observer = publisher
    try:
        trail = AuditTrail(store, Clock())
        trail.record("acme", "alice", "token.create", "/api/user/tokens", 200, "127.0.0.1")
    finally:
        audit_module.log.observer = original
    Logger(observer=publisher).info("listening on {port}", port=8080)
    Logger(observer=publisher).info("GET /api/user 200", log_type="access", status=200)
    lines = [json.loads(line) for line in main.read_text().splitlines()]
    assert [line["log_type"] for line in lines] == ["audit", "operational"]  # no access
    assert lines[1]["message"] == "listening on 8080"
    (event,) = [json.loads(line) for line in audit.read_text().splitlines()]
    assert event["log_type"] == "audit"
    assert (event["actor"], event["action"], event["status"]) == ("alice", "token.create", 200)
    assert event["client_ip"] == "127.0.0.1" and event["auth_failure"] is False
    assert event["level"] == "info" and "T" in event["time"]
    store.close()
