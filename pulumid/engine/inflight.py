"""The state of updates in flight: journal replayers and delta-checkpoint baselines.

Each running journaling update keeps a JournalReplayer in memory that every acknowledged batch
advances, so the state is materialised once, when the update ends (whatever its outcome), and
reads after it cost nothing extra. Each delta-checkpointing update keeps the text of its last
checkpoint, the baseline of the next delta. Everything here can be rebuilt from the store:
the base state (version N as it was at start), the journal batches, the deltas.

Both caches are bounded by an estimate of the memory they hold and rebuilt from the store on
a miss; ending an update, however it ends, frees its entries. Replaying a batch runs on the
CPU pool, under the update's lock, so the reactor never walks a state.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import msgspec
from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime

from pulumid.engine import deployments
from pulumid.engine.journal import JournalError, JournalReplayer, walks_the_state
from pulumid.errors import BadRequest, Stale
from pulumid.storage.interface import Store
from pulumid.storage.records import StateBlob, UpdateRecord
from pulumid.threads import Runner, release_memory_blocking

V = TypeVar("V")

# What the in-memory state of updates in flight may hold, in bytes of JSON text. Parsed
# replay state takes a few times its text; a miss costs a rebuild from the store.
DEFAULT_BUDGET = 512 * 1024 * 1024


# Journal batches up to this many bytes of JSON are parsed and applied on the reactor.
INLINE_JOURNAL = 64 * 1024

# An update that held this much (bytes of JSON text) hands the freed heap back as it ends.
RELEASE_AFTER = 16 * 1024 * 1024

# Deltas are compacted into a whole state once they add up to more than the state, or this.
COMPACT_AFTER = 1024 * 1024


@dataclass(frozen=True)
class Baseline:
    """A delta-checkpointing update's last state text, the base of its next delta."""

    sequence: int
    text: bytes
    # Bytes of the deltas stored since the last whole state (0: version N is this text).
    delta_bytes: int


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class CostLRU(Generic[V]):
    """A least-recently-used map bounded by the summed cost of its values."""

    def __init__(self, budget: int, cost: Callable[[V], int]) -> None:
        self.budget = budget
        self._cost = cost
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self.total = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, value: V) -> None:
        self.pop(key)
        cost = self._cost(value)
        self._items[key] = (value, cost)
        self.total += cost
        # The newest entry stays even when it alone is over budget: it is in use.
        while self.total > self.budget and len(self._items) > 1:
            _key, (_value, old) = self._items.popitem(last=False)
            self.total -= old

    def recost(self, key: str) -> None:
        item = self._items.get(key)
        if item is not None:
            self.put(key, item[0])

    def pop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.total -= item[1]


class InFlight:
    def __init__(
        self,
        store: Store,
        cpu: Runner,
        clock: IReactorTime,
        limit: int,
        budget: int = DEFAULT_BUDGET,
    ) -> None:
        self._store = store
        self._cpu = cpu
        self._clock = clock
        self._limit = limit
        # Half the budget each: a burst of one kind cannot evict every entry of the other.
        self.journals: CostLRU[JournalReplayer] = CostLRU(budget // 2, lambda r: r.text_bytes)
        self.baselines: CostLRU[Baseline] = CostLRU(budget // 2, lambda b: len(b.text))
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
        self.journals.pop(update_id)
        self.baselines.pop(update_id)

    # -- journaling -----------------------------------------------------------------------

    async def _replayer(self, update: UpdateRecord, *, fresh: bool = False) -> JournalReplayer:
        """The update's replayer: the cached one, or (on a miss, or with `fresh` when the
        cache may lag another node's appends) one rebuilt from the store."""
        replayer = self.journals.get(update.id)
        if replayer is not None and not fresh:
            return replayer
        base = await self._store.get_state(update.stack_id, update.version)
        stored = await self._store.get_journal(update.id)
        replayer = await self._cpu.run(self._rebuild_blocking, base, stored)
        self.journals.put(update.id, replayer)
        return replayer

    async def _checked_replayer(self, update: UpdateRecord) -> JournalReplayer:
        """The replayer holding every stored batch: the cached one, caught up with what other
        nodes appended since (only the missing batches are read), or one rebuilt."""
        replayer = self.journals.get(update.id)
        if replayer is None:
            return await self._replayer(update)
        if self._store.exclusive:
            return replayer  # no other node appends: the cached one is current
        length = await self._store.journal_length(update.id)
        if length < replayer.batches:
            return await self._replayer(update, fresh=True)  # cannot happen; be safe
        if length > replayer.batches:
            missing = await self._store.get_journal(update.id, after=replayer.batches)
            await self._cpu.run(self._catch_up_blocking, replayer, missing)
            self.journals.recost(update.id)
        return replayer

    def _catch_up_blocking(self, replayer: JournalReplayer, missing: list[bytes]) -> None:
        replayer.add(deployments.stored_journal_blocking(missing, self._limit))
        replayer.batches += len(missing)
        replayer.text_bytes += sum(len(body) for body in missing)

    def _rebuild_blocking(self, base: StateBlob | None, stored: list[bytes]) -> JournalReplayer:
        document: dict[str, Any] = {}
        text_bytes = 0
        if base is not None:
            text = deployments.gunzip_blocking(base.gzipped, 1 << 34)
            text_bytes = len(text)
            # Checked when it was stored: parsed as is (msgspec holds no copy of the text
            # while it parses, orjson one more), and the text let go at once.
            document = msgspec.json.decode(text)
            del text
        replayer = JournalReplayer(document.get("deployment") or {})
        replayer.add(deployments.stored_journal_blocking(stored, self._limit))
        replayer.text_bytes = text_bytes + sum(len(body) for body in stored)
        replayer.batches = len(stored)
        return replayer

    @staticmethod
    def _apply_blocking(
        replayer: JournalReplayer, body: bytes, entries: list[dict[str, Any]] | None = None
    ) -> None:
        # Parsed and applied in one trip to the pool: each trip costs as much as a small batch.
        if entries is None:
            entries = deployments.journal_entries_blocking(body)
        replayer.add(entries, check=True)

    async def add_journal(
        self, update: UpdateRecord, token_hash: str, wire: bytes, body: bytes
    ) -> None:
        """Validate and apply a batch in memory, then persist it before acknowledging.

        The replayer first catches up with batches other nodes appended (behind a load
        balancer, consecutive batches land on different nodes). The append is conditional on
        the journal still having as many batches as the replayer applied: if another node
        appended in between, the replayer is rebuilt and the batch applied again (once), so
        no node ever extends a journal it has not seen.
        """
        # A small batch costs less to parse and apply than a trip to the pool and back,
        # unless an entry makes the replay walk the whole state.
        entries = None
        if len(body) < INLINE_JOURNAL:
            entries = deployments.journal_entries_blocking(body)
        inline = entries is not None and not any(walks_the_state(e) for e in entries)
        async with self._locked(update.id):
            for last_try in (False, True):
                replayer = await self._checked_replayer(update)
                try:
                    if inline:
                        self._apply_blocking(replayer, body, entries)
                    else:
                        await self._cpu.run(self._apply_blocking, replayer, body, entries)
                except JournalError as e:
                    if not last_try and await self._lags(replayer, update):
                        self.journals.pop(update.id)  # half-applied: rebuild and retry
                        continue
                    raise BadRequest(f"Bad Request: invalid journal entry: {e}") from None
                try:
                    replayer.batches = await self._store.append_journal(
                        update.id, token_hash, self._clock.seconds(), wire, replayer.batches
                    )
                except Stale:
                    self.journals.pop(update.id)
                    if last_try:
                        raise
                    continue
                except BaseException:
                    self.journals.pop(update.id)  # rebuilt from what was persisted
                    raise
                replayer.text_bytes += len(body)
                self.journals.recost(update.id)
                return

    async def _lags(self, replayer: JournalReplayer, update: UpdateRecord) -> bool:
        return replayer.batches != await self._store.journal_length(update.id)

    # -- delta checkpoints ----------------------------------------------------------------

    async def _baseline(self, update: UpdateRecord) -> Baseline:
        cached = self.baselines.get(update.id)
        # Behind the stored sequence means another node saved since: rebuild.
        if cached is not None and cached.sequence >= update.checkpoint_seq:
            return cached
        state = await self._store.get_state(update.stack_id, update.version)
        deltas = await self._store.get_deltas(update.id)
        rebuilt = await self._cpu.run(self._rebuild_baseline_blocking, update, state, deltas)
        self.baselines.put(update.id, rebuilt)
        return rebuilt

    def _rebuild_baseline_blocking(
        self, update: UpdateRecord, state: StateBlob | None, deltas: list[tuple[int, bytes]]
    ) -> Baseline:
        text = deployments.gunzip_blocking(state.gzipped, 1 << 34) if state else b""
        sequence = update.checkpoint_seq if not deltas else 0
        for _seq, body in deltas:
            if body[:2] == b"\x1f\x8b":
                body = deployments.gunzip_blocking(body, self._limit)
            # Each was checked when it arrived: no need to parse every result again.
            applied = deployments.apply_delta_blocking(text, sequence, body, check=False)
            if applied is not None:
                sequence, text = applied
        return Baseline(sequence, text, sum(len(body) for _seq, body in deltas))

    async def save_full(self, update: UpdateRecord, token_hash: str, body: bytes) -> None:
        state = await self._cpu.run(deployments.checkpoint_state_blocking, body)
        async with self._locked(update.id):
            await self._store.save_checkpoint(update.id, token_hash, self._clock.seconds(), state)
            self.baselines.pop(update.id)  # the next delta's baseline is this state

    async def save_verbatim(self, update: UpdateRecord, token_hash: str, body: bytes) -> None:
        text, count, sequence = await self._cpu.run(deployments.verbatim_text_blocking, body)
        state = StateBlob(await self._cpu.run(deployments.gzip_blocking, text), count)
        async with self._locked(update.id):
            saved = await self._store.save_checkpoint(
                update.id, token_hash, self._clock.seconds(), state, sequence
            )
            if saved:
                self.baselines.put(update.id, Baseline(sequence, text, 0))

    async def save_delta(
        self, update: UpdateRecord, token_hash: str, wire: bytes, body: bytes
    ) -> None:
        async with self._locked(update.id):
            baseline = await self._baseline(update)
            applied = await self._cpu.run(
                deployments.apply_delta_blocking, baseline.text, baseline.sequence, body
            )
            if applied is None:
                return  # a retry of the delta we already hold
            sequence, text = applied
            now = self._clock.seconds()
            pending = baseline.delta_bytes + len(wire)
            if pending > max(len(text), COMPACT_AFTER):
                # The deltas since the last whole state now outweigh it: store it whole
                # instead, so storage and a rebuild stay proportional to the state.
                state = await self._cpu.run(deployments.state_from_text_blocking, text)
                if await self._store.save_checkpoint(update.id, token_hash, now, state, sequence):
                    self.baselines.put(update.id, Baseline(sequence, text, 0))
            elif await self._store.save_delta(update.id, token_hash, now, sequence, wire):
                self.baselines.put(update.id, Baseline(sequence, text, pending))

    # -- materialising --------------------------------------------------------------------

    async def current_state(self, update: UpdateRecord) -> StateBlob | None:
        """The update's state now, when the stored version N is behind it; else None."""
        async with self._locked(update.id):
            return await self._current_state(update, reading=True)

    async def _current_state(self, update: UpdateRecord, reading: bool = False) -> StateBlob | None:
        if update.dry_run:
            return None
        if update.journal_version:
            if reading and await self._nothing_journaled(update):
                # The CLI reads its base as an update starts: version N is the state, sent as
                # stored instead of parsed and built again.
                return None
            replayer = await self._checked_replayer(update)
            return await self._cpu.run(
                self._generate_blocking, replayer, self._clock.seconds(), update.engine_version
            )
        baseline = self.baselines.get(update.id)
        if baseline is None or baseline.sequence < update.checkpoint_seq:
            if update.checkpoint_seq == 0 or not await self._store.has_deltas(update.id):
                return None  # no checkpoint, or the last one is stored whole as version N
            baseline = await self._baseline(update)
        if baseline.delta_bytes == 0:
            return None  # the last save was stored whole, as version N
        return await self._cpu.run(deployments.state_from_text_blocking, baseline.text)

    async def _nothing_journaled(self, update: UpdateRecord) -> bool:
        cached = self.journals.get(update.id)
        if cached is not None and self._store.exclusive:
            return cached.batches == 0
        return await self._store.journal_length(update.id) == 0

    @staticmethod
    def _generate_blocking(replayer: JournalReplayer, now: float, engine_version: str) -> StateBlob:
        document = replayer.generate(now_iso=rfc3339(now), engine_version=engine_version)
        return deployments.state_from_document_blocking(document)

    async def finish(self, update: UpdateRecord) -> StateBlob | None:
        """Materialise the final state of an update that is ending; then forget it."""
        async with self._locked(update.id):
            held = self._held(update.id)
            try:
                return await self._current_state(update)
            finally:
                self.forget(update.id)
                if held >= RELEASE_AFTER:
                    await self._cpu.run(release_memory_blocking)

    def _held(self, update_id: str) -> int:
        replayer = self.journals.get(update_id)
        baseline = self.baselines.get(update_id)
        return (replayer.text_bytes if replayer else 0) + (len(baseline.text) if baseline else 0)
