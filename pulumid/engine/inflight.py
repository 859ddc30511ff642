"""The state of updates in flight: journal replayers and delta-checkpoint baselines.

Each running journaling update keeps a JournalReplayer in memory that every acknowledged batch
advances, so the state is materialised once, when the update ends (whatever its outcome), and
reads after it cost nothing extra. Each delta-checkpointing update keeps the text of its last
checkpoint, the baseline of the next delta. Everything here can be rebuilt from the store:
the base state (version N as it was at start), the journal batches, the deltas.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime

from pulumid.engine import deployments
from pulumid.engine.journal import JournalError, JournalReplayer
from pulumid.errors import BadRequest
from pulumid.storage.interface import Store
from pulumid.storage.records import StateBlob, UpdateRecord
from pulumid.threads import Runner


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class InFlight:
    def __init__(
        self, store: Store, cpu: Runner, clock: IReactorTime, limit: int, cached: int = 8
    ) -> None:
        self._store = store
        self._cpu = cpu
        self._clock = clock
        self._limit = limit
        self._cached = cached
        self._journals: dict[str, JournalReplayer] = {}
        self._baselines: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self._locks: dict[str, DeferredLock] = {}

    @asynccontextmanager
    async def _locked(self, update_id: str) -> AsyncIterator[None]:
        """Requests of one update run one at a time (the CLI sends them in order anyway)."""
        lock = self._locks.setdefault(update_id, DeferredLock())
        await lock.acquire()
        try:
            yield
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(update_id, None)

    def forget(self, update_id: str) -> None:
        self._journals.pop(update_id, None)
        self._baselines.pop(update_id, None)

    def _remember(self, cache: OrderedDict[str, Any], key: str, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > self._cached:
            cache.popitem(last=False)

    # -- journaling -----------------------------------------------------------------------

    async def _replayer(self, update: UpdateRecord) -> JournalReplayer:
        replayer = self._journals.get(update.id)
        if replayer is not None:
            return replayer
        base = await self._store.get_state(update.stack_id, update.version)
        stored = await self._store.get_journal(update.id)
        replayer = await self._cpu.run(self._rebuild_blocking, base, stored)
        # Kept until the update ends (complete, cancel, expiry): evicting the replayer of a
        # running update would make every later batch replay its whole journal again.
        self._journals[update.id] = replayer
        return replayer

    def _rebuild_blocking(self, base: StateBlob | None, stored: list[bytes]) -> JournalReplayer:
        document: dict[str, Any] = {}
        if base is not None:
            document = deployments.parse_state_blocking(base)
        replayer = JournalReplayer(document.get("deployment") or {})
        replayer.add(deployments.stored_journal_blocking(stored, self._limit))
        return replayer

    async def add_journal(self, update: UpdateRecord, token: str, wire: bytes, body: bytes) -> None:
        """Validate and apply a batch in memory, then persist it before acknowledging."""
        entries = await self._cpu.run(deployments.journal_entries_blocking, body)
        async with self._locked(update.id):
            replayer = await self._replayer(update)
            try:
                replayer.add(entries)
            except JournalError as e:
                self._journals.pop(update.id, None)  # rebuilt from what was persisted
                raise BadRequest(f"Bad Request: invalid journal entry: {e}") from None
            try:
                await self._store.append_journal(update.id, token, self._clock.seconds(), wire)
            except BaseException:
                self._journals.pop(update.id, None)
                raise

    # -- delta checkpoints ----------------------------------------------------------------

    async def _baseline(self, update: UpdateRecord) -> tuple[int, bytes]:
        cached = self._baselines.get(update.id)
        if cached is not None:
            return cached
        state = await self._store.get_state(update.stack_id, update.version)
        deltas = await self._store.get_deltas(update.id)
        rebuilt = await self._cpu.run(self._rebuild_baseline_blocking, update, state, deltas)
        self._remember(self._baselines, update.id, rebuilt)
        return rebuilt

    def _rebuild_baseline_blocking(
        self, update: UpdateRecord, state: StateBlob | None, deltas: list[tuple[int, bytes]]
    ) -> tuple[int, bytes]:
        text = deployments.gunzip_blocking(state.gzipped, 1 << 34) if state else b""
        sequence = update.checkpoint_seq if not deltas else 0
        for _seq, body in deltas:
            if body[:2] == b"\x1f\x8b":
                body = deployments.gunzip_blocking(body, self._limit)
            applied = deployments.apply_delta_blocking(text, sequence, body)
            if applied is not None:
                sequence, text = applied
        return sequence, text

    async def save_verbatim(self, update: UpdateRecord, token: str, body: bytes) -> None:
        text, count, sequence = await self._cpu.run(deployments.verbatim_text_blocking, body)
        state = StateBlob(await self._cpu.run(deployments.gzip_blocking, text), count)
        async with self._locked(update.id):
            await self._store.save_checkpoint(
                update.id, token, self._clock.seconds(), state, sequence
            )
            self._remember(self._baselines, update.id, (sequence, text))

    async def save_delta(self, update: UpdateRecord, token: str, wire: bytes, body: bytes) -> None:
        async with self._locked(update.id):
            sequence, baseline = await self._baseline(update)
            applied = await self._cpu.run(
                deployments.apply_delta_blocking, baseline, sequence, body
            )
            if applied is None:
                return  # a retry of the delta we already hold
            await self._store.save_delta(update.id, token, self._clock.seconds(), applied[0], wire)
            self._remember(self._baselines, update.id, applied)

    # -- materialising --------------------------------------------------------------------

    async def current_state(self, update: UpdateRecord) -> StateBlob | None:
        """The update's state now, when the stored version N is behind it; else None."""
        async with self._locked(update.id):
            return await self._current_state(update)

    async def _current_state(self, update: UpdateRecord) -> StateBlob | None:
        if update.dry_run:
            return None
        if update.journal_version:
            replayer = await self._replayer(update)
            return await self._cpu.run(
                self._generate_blocking, replayer, self._clock.seconds(), update.engine_version
            )
        if update.checkpoint_seq == 0 and update.id not in self._baselines:
            return None  # no verbatim or delta checkpoint: version N is current
        if not await self._store.get_deltas(update.id):
            return None  # the last save was a full one, stored as version N
        _sequence, text = await self._baseline(update)
        return await self._cpu.run(deployments.state_from_text_blocking, text)

    @staticmethod
    def _generate_blocking(replayer: JournalReplayer, now: float, engine_version: str) -> StateBlob:
        document = replayer.generate(now_iso=rfc3339(now), engine_version=engine_version)
        return deployments.state_from_document_blocking(document)

    async def finish(self, update: UpdateRecord) -> StateBlob | None:
        """Materialise the final state of an update that is ending; then forget it."""
        async with self._locked(update.id):
            try:
                return await self._current_state(update)
            finally:
                self.forget(update.id)
