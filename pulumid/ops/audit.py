"""The audit trail: who did what, to what, with which outcome, from where.

Each event is a twisted.logger event with `log_type: "audit"` (routed like any other log
line, or to its own destination: see `AuditFile`) and a row in the database, queryable by
admins. Rows are written in batches off the request path: a request never waits for its
audit row, and a failed write is logged and retried with the next batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger, LogPublisher, globalLogPublisher
from zope.interface import implementer

from pulumid.errors import PulumidError
from pulumid.storage.interface import Store
from pulumid.storage.records import AuditRecord

log = Logger(namespace="pulumid.audit")

MAX_BACKLOG = 10_000


class AuditTrail:
    def __init__(self, store: Store, clock: IReactorTime) -> None:
        self._store = store
        self._clock = clock
        self._pending: list[AuditRecord] = []
        self._writing: Deferred[None] | None = None

    def record(
        self,
        org: str,
        actor: str,
        action: str,
        resource: str,
        status: int,
        client_ip: str,
        description: str = "",
        auth_failure: bool = False,
    ) -> AuditRecord:
        event = AuditRecord(
            time=self._clock.seconds(),
            org=org,
            actor=actor,
            action=action,
            resource=resource,
            status=status,
            client_ip=client_ip,
            description=description,
            auth_failure=auth_failure,
        )
        log.info(
            "audit: {actor} {action} {resource} -> {status}",
            log_type="audit",
            actor=actor,
            action=action,
            resource=resource,
            status=status,
            org=org,
            client_ip=client_ip,
            description=description,
            auth_failure=auth_failure,
            time_epoch=event.time,
        )
        if len(self._pending) < MAX_BACKLOG:
            self._pending.append(event)
        if self._writing is None:
            self._writing = Deferred.fromCoroutine(self._write())
        return event

    async def _write(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._store.add_audit_events(batch)
                except PulumidError as e:
                    log.error("audit rows not stored yet ({error}); retrying", error=e)
                    self._pending[:0] = batch
                    await _sleep(self._clock, 1.0)
        finally:
            self._writing = None

    async def flush(self) -> None:
        """Wait until every recorded event is stored (tests, shutdown)."""
        while self._writing is not None:
            await self._writing


def _sleep(clock: IReactorTime, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    clock.callLater(seconds, d.callback, None)
    return d


@implementer(ILogObserver)
class AuditFile:
    """Writes audit events as JSON lines to stdout, stderr or a file (appended)."""

    FIELDS = ("actor", "action", "resource", "status", "org", "client_ip", "description")

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    @classmethod
    def open(cls, destination: str) -> AuditFile:
        if destination == "stdout":
            return cls(sys.stdout)
        if destination == "stderr":
            return cls(sys.stderr)
        return cls(Path(destination).open("a", buffering=1))

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_type") != "audit":
            return
        line = {"log_type": "audit", "time": event.get("time_epoch", event.get("log_time"))}
        line.update({name: event.get(name) for name in self.FIELDS})
        line["auth_failure"] = bool(event.get("auth_failure"))
        self._stream.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._stream.flush()


class AuditDestination(service.Service):
    """Routes audit events to their own destination while the daemon runs."""

    def __init__(self, destination: str, publisher: LogPublisher = globalLogPublisher) -> None:
        self.destination = destination
        self.publisher = publisher
        self._observer: AuditFile | None = None

    def startService(self) -> None:
        super().startService()
        self._observer = AuditFile.open(self.destination)
        self.publisher.addObserver(self._observer)

    def stopService(self) -> None:
        super().stopService()
        if self._observer is not None:
            self.publisher.removeObserver(self._observer)
            self._observer = None
