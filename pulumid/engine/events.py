"""Engine events: buffered in memory as they arrive, written in order by a timed flush."""

from __future__ import annotations

from typing import Any

import orjson
from twisted.logger import Logger

from pulumid.storage.interface import Store
from pulumid.storage.records import StoredEvent


class EventBuffer:
    log = Logger()

    def __init__(self, store: Store, max_pending: int = 5000) -> None:
        self._store = store
        self._pending: dict[str, list[StoredEvent]] = {}
        self._summaries: dict[str, dict[str, int]] = {}
        self._count = 0
        self._max_pending = max_pending

    @property
    def pending(self) -> int:
        return self._count

    async def add(self, update_id: str, events: list[dict[str, Any]]) -> None:
        batch = self._pending.setdefault(update_id, [])
        for event in events:
            batch.append(StoredEvent(int(event["sequence"]), orjson.dumps(event)))
            summary = event.get("summaryEvent")
            if isinstance(summary, dict) and isinstance(summary.get("resourceChanges"), dict):
                self._summaries[update_id] = {
                    str(op): int(n)
                    for op, n in summary["resourceChanges"].items()
                    if isinstance(n, int)
                }
        self._count += len(events)
        if self._count >= self._max_pending:
            await self.flush()

    async def flush(self) -> None:
        """Write everything buffered; on failure the events stay buffered for the next try."""
        if not self._pending and not self._summaries:
            return
        pending, summaries = self._pending, self._summaries
        self._pending, self._summaries, self._count = {}, {}, 0
        batches = [
            (uid, sorted(events, key=lambda e: e.sequence)) for uid, events in pending.items()
        ]
        try:
            await self._store.append_events(batches, summaries)
        except BaseException:
            for uid, events in pending.items():
                self._pending.setdefault(uid, [])[:0] = events
                self._count += len(events)
            for uid, changes in summaries.items():
                self._summaries.setdefault(uid, changes)
            raise
