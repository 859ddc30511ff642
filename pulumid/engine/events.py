"""Engine events: stored before they are acknowledged, many requests to one commit.

An event at least COMPRESS_FROM bytes long is stored gzipped: resource events carry the
resource's inputs and outputs, so an update's events weigh about as much as its state
again, and most of that compresses well. A stored event is gzip if it starts with gzip's
magic bytes (JSON text never does), so rows written before this read as they are.

Requests that arrive while a write is in flight wait for the next one, which takes all of
them (group commit): with an fsync per commit, the cost of durability is shared. If a group
fails, each update's share is retried alone, so one update's bad batch (its stack deleted
meanwhile, say) fails only its own request and never the others'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pulumid.engine.deployments import gunzip_blocking, gzip_blocking
from pulumid.errors import BadRequest
from pulumid.storage.interface import Store
from pulumid.storage.records import StoredEvent

# Sequence numbers are stored as SQL integers (signed 64-bit).
MAX_SEQUENCE = 2**63 - 1

# Events this long or longer are stored gzipped (shorter ones gain little or nothing).
COMPRESS_FROM = 1024
GZIP_MAGIC = b"\x1f\x8b"
# What a stored event may inflate to: a bound on the read, not a request limit (events kept
# from before a lower --max-body-size must still read).
MAX_EVENT_BYTES = 1 << 31


def packed(data: bytes) -> bytes:
    """An event's JSON as stored."""
    return gzip_blocking(data) if len(data) >= COMPRESS_FROM else data


def is_packed(event: StoredEvent) -> bool:
    return event.data[:2] == GZIP_MAGIC


def unpacked(events: list[StoredEvent]) -> list[StoredEvent]:
    """Stored events with their JSON text."""
    return [
        StoredEvent(e.sequence, gunzip_blocking(e.data, MAX_EVENT_BYTES)) if is_packed(e) else e
        for e in events
    ]


@dataclass
class _Pending:
    update_id: str
    events: list[StoredEvent]
    summary: dict[str, int] | None
    done: Deferred[None] = field(default_factory=Deferred)


def encode_events(events: Any) -> tuple[list[StoredEvent], dict[str, int] | None]:
    """Validate a batch at the door: what is acknowledged can always be stored and read."""
    if not isinstance(events, list) or not events:
        raise BadRequest("Bad Request: No events provided.")
    stored: list[StoredEvent] = []
    summary: dict[str, int] | None = None
    for event in events:
        sequence = event.get("sequence") if isinstance(event, dict) else None
        if (
            not isinstance(sequence, int)
            or isinstance(sequence, bool)
            or not 0 <= sequence <= MAX_SEQUENCE
        ):
            raise BadRequest(
                f"Bad Request: every event needs an integer 'sequence' from 0 to {MAX_SEQUENCE}"
            )
        stored.append(StoredEvent(sequence, packed(orjson.dumps(event))))
        found = event.get("summaryEvent")
        if isinstance(found, dict) and isinstance(found.get("resourceChanges"), dict):
            summary = {
                str(op): n
                for op, n in found["resourceChanges"].items()
                if isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_SEQUENCE
            }
    stored.sort(key=lambda e: e.sequence)
    return stored, summary


class EventWriter:
    log = Logger()

    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: list[_Pending] = []
        self._writing = False
        self.commits = 0  # group commits so far (for tests and metrics)

    async def add(
        self, update_id: str, events: list[StoredEvent], summary: dict[str, int] | None
    ) -> None:
        """Store the events; returns once they are committed, or raises why not."""
        pending = _Pending(update_id, events, summary)
        self._queue.append(pending)
        if not self._writing:
            self._writing = True
            Deferred.fromCoroutine(self._drain())
        await pending.done

    async def _drain(self) -> None:
        try:
            while self._queue:
                group, self._queue = self._queue, []
                try:
                    await self._write(group)
                except Exception:
                    for one in group:
                        await self._write_alone(one)
                else:
                    for one in group:
                        one.done.callback(None)
        finally:
            self._writing = False

    async def _write(self, group: list[_Pending]) -> None:
        batches: dict[str, list[StoredEvent]] = {}
        summaries: dict[str, dict[str, int]] = {}
        for one in group:
            batches.setdefault(one.update_id, []).extend(one.events)
            if one.summary is not None:
                summaries[one.update_id] = one.summary
        await self._store.append_events(list(batches.items()), summaries)
        self.commits += 1

    async def _write_alone(self, one: _Pending) -> None:
        try:
            await self._write([one])
        except Exception:
            failure = Failure()
            self.log.info(
                "events of update {update_id} not stored: {error}",
                update_id=one.update_id,
                error=failure.getErrorMessage(),
            )
            one.done.errback(failure)
        else:
            one.done.callback(None)
