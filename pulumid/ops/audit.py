"""The audit trail: who did what, to what, with which outcome, from where.

Each event is a twisted.logger event with `log_type: "audit"` (routed like any other log
line, or to a destination of its own: pulumid.ops.logs) and a row in the database, queryable
by admins. Rows are written in batches off the request path: a request never waits for its
audit row, and a failed write is logged and retried with the next batch.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pulumid.errors import PulumidError, ShuttingDown
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
            writing = Deferred.fromCoroutine(self._write())
            # A write that finished at once (failed synchronously) has already cleared it.
            if not writing.called:
                self._writing = writing
        return event

    async def _write(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._store.add_audit_events(batch)
                except ShuttingDown:
                    # Recorded after the storage threads stopped: the events went to the
                    # log stream; a retry would only loop until the process exits.
                    log.warn(
                        "{count} audit rows not stored: the daemon is stopping",
                        count=len(batch) + len(self._pending),
                    )
                    self._pending = []
                    return
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
