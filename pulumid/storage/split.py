"""Metadata in one store, blobs in another (issue 14): a Store over a Store and a BlobStore.

State versions, journal batches and delta bodies go to the BlobStore first; the metadata row
then holds a reference (REF + key) in place of the bytes, so a row never names a blob that is
not durable yet. Reads resolve references. A blob whose row never came (a crash or a refused
write between the two) or whose row was deleted later is an orphan: `collect` deletes blobs
that no row references once they are older than a grace period, so a blob whose row is still
being committed is never taken.

Keys carry their creation time in milliseconds: `states/<stack>/<ms>-<random>`,
`journal/<update>/<ms>-<random>`, `deltas/<update>/<ms>-<random>`. The random part makes every
write a new object, so a retried or ignored write never overwrites a blob a row still names.
Rows written inline before object storage was configured stay readable as they are.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, FirstError
from twisted.logger import Logger

from pulumid.errors import PulumidError, Unavailable
from pulumid.storage.blobs import BlobStore
from pulumid.storage.interface import Store
from pulumid.storage.records import (
    AuditRecord,
    IdentityRecord,
    RetentionRules,
    StackRecord,
    StackRef,
    StateBlob,
    StoredEvent,
    TokenRecord,
    UpdateRecord,
    WrappedKey,
)

T = TypeVar("T")
log = Logger()

# Neither gzip (1f 8b) nor JSON text can start with a NUL byte.
REF = b"\x00pulumid-blob:"
KINDS = ("states", "journal", "deltas")
# An unreferenced blob younger than this may still be waiting for its row's commit.
GRACE_SECONDS = 3600.0
# Blob reads of one journal in flight at once.
PARALLEL_READS = 8


def is_ref(data: bytes) -> bool:
    return data.startswith(REF)


def new_key(kind: str, owner: str, now: float) -> str:
    """A fresh key for a blob of KIND belonging to OWNER, made at NOW (seconds)."""
    return f"{kind}/{owner}/{int(now * 1000):013d}-{secrets.token_hex(8)}"


def key_time(key: str) -> float | None:
    """Creation time (seconds) encoded in KEY, or None if KEY is not one of ours."""
    stamp = key.rsplit("/", 1)[-1].split("-", 1)[0]
    return int(stamp) / 1000 if stamp.isdigit() else None


class BlobbedStore:
    """The Store contract, with the bulky bytes of META's rows kept in BLOBS."""

    def __init__(
        self, meta: Store, blobs: BlobStore, clock: Callable[[], float] = time.time
    ) -> None:
        self.meta = meta
        self.blobs = blobs
        self._clock = clock
        self.exclusive = meta.exclusive  # the rows (and so the journal) live in META

    def close(self) -> None:
        self.blobs.close()
        self.meta.close()

    # -- blob plumbing --------------------------------------------------------------------

    async def _put(self, kind: str, owner: str, data: bytes) -> tuple[str, bytes]:
        key = new_key(kind, owner, self._clock())
        await self.blobs.put(key, data)
        return key, REF + key.encode()

    async def _put_state(
        self, owner: str, state: StateBlob | None
    ) -> tuple[str | None, StateBlob | None]:
        if state is None:
            return None, None
        key, ref = await self._put("states", owner, state.gzipped)
        return key, StateBlob(ref, state.resource_count)

    async def _resolve(self, data: bytes) -> bytes:
        if not is_ref(data):
            return data  # written inline, before object storage was configured
        key = data[len(REF) :].decode()
        blob = await self.blobs.get(key)
        if blob is None:
            raise Unavailable(f"object storage has lost blob {key}: restore it from a backup")
        return blob

    async def _resolve_all(self, items: list[bytes]) -> list[bytes]:
        limit = DeferredSemaphore(PARALLEL_READS)
        reads = [limit.run(self._resolve, data) for data in items]
        try:
            results = await DeferredList(reads, fireOnOneErrback=True, consumeErrors=True)
        except FirstError as e:
            e.subFailure.raiseException()
        return [value for _ok, value in results]

    async def _written(self, key: str | None, write: Deferred[T], kept: Callable[[T], bool]) -> T:
        """WRITE's result; the blob KEY is deleted at once when the row surely did not take it
        (ignored, or refused): a storage failure may still have committed, so GC decides."""
        try:
            result = await write
        except Unavailable:
            raise
        except PulumidError:
            await self._forget(key)
            raise
        if not kept(result):
            await self._forget(key)
        return result

    async def _forget(self, key: str | None) -> None:
        if key is None:
            return
        try:
            await self.blobs.delete([key])
        except PulumidError as e:
            log.warn("could not delete unused blob {key}: {error}", key=key, error=str(e))

    # -- writes that carry blobs ----------------------------------------------------------

    def create_stack(
        self, ref: StackRef, tags: dict[str, str], now: float, initial: StateBlob | None
    ) -> Deferred[StackRecord]:
        # The stack id is not known before the row exists: initial states go under "new".
        async def go() -> StackRecord:
            key, stored = await self._put_state("new", initial)
            write = self.meta.create_stack(ref, tags, now, stored)
            return await self._written(key, write, lambda _r: True)

        return Deferred.fromCoroutine(go())

    def rename_stack(
        self,
        stack_id: int,
        new_ref: StackRef,
        expected_version: int,
        state: StateBlob | None,
        update: UpdateRecord | None,
        keep_versions: int,
    ) -> Deferred[None]:
        async def go() -> None:
            key, stored = await self._put_state(str(stack_id), state)
            write = self.meta.rename_stack(
                stack_id, new_ref, expected_version, stored, update, keep_versions
            )
            await self._written(key, write, lambda _r: True)

        return Deferred.fromCoroutine(go())

    def save_checkpoint(
        self, update_id: str, token_hash: str, now: float, state: StateBlob, sequence: int = 0
    ) -> Deferred[bool]:
        async def go() -> bool:
            key, blob = await self._put("states", update_id, state.gzipped)
            stored = StateBlob(blob, state.resource_count)
            write = self.meta.save_checkpoint(update_id, token_hash, now, stored, sequence)
            return await self._written(key, write, bool)

        return Deferred.fromCoroutine(go())

    def save_delta(
        self, update_id: str, token_hash: str, now: float, sequence: int, body: bytes
    ) -> Deferred[bool]:
        async def go() -> bool:
            key, stored = await self._put("deltas", update_id, body)
            write = self.meta.save_delta(update_id, token_hash, now, sequence, stored)
            return await self._written(key, write, bool)

        return Deferred.fromCoroutine(go())

    def append_journal(
        self, update_id: str, token_hash: str, now: float, body: bytes, after: int | None = None
    ) -> Deferred[int]:
        async def go() -> int:
            key, stored = await self._put("journal", update_id, body)
            write = self.meta.append_journal(update_id, token_hash, now, stored, after)
            return await self._written(key, write, lambda _r: True)

        return Deferred.fromCoroutine(go())

    def complete_update(
        self,
        update_id: str,
        token_hash: str,
        now: float,
        status: str,
        keep_versions: int,
        state: StateBlob | None = None,
        failure: str | None = None,
    ) -> Deferred[None]:
        async def go() -> None:
            key, stored = await self._put_state(update_id, state)
            write = self.meta.complete_update(
                update_id, token_hash, now, status, keep_versions, stored, failure
            )
            await self._written(key, write, lambda _r: True)

        return Deferred.fromCoroutine(go())

    def cancel_update(
        self,
        update_id: str,
        now: float,
        state: StateBlob | None = None,
        keep_versions: int = 0,
        failure: str | None = None,
    ) -> Deferred[None]:
        async def go() -> None:
            key, stored = await self._put_state(update_id, state)
            write = self.meta.cancel_update(update_id, now, stored, keep_versions, failure)
            await self._written(key, write, lambda _r: True)

        return Deferred.fromCoroutine(go())

    def expire_update(
        self,
        update_id: str,
        now: float,
        state: StateBlob | None = None,
        keep_versions: int = 0,
        failure: str | None = None,
    ) -> Deferred[bool]:
        async def go() -> bool:
            key, stored = await self._put_state(update_id, state)
            write = self.meta.expire_update(update_id, now, stored, keep_versions, failure)
            return await self._written(key, write, bool)

        return Deferred.fromCoroutine(go())

    def import_state(
        self, update: UpdateRecord, state: StateBlob, keep_versions: int
    ) -> Deferred[int]:
        async def go() -> int:
            key, blob = await self._put("states", update.id, state.gzipped)
            write = self.meta.import_state(
                update, StateBlob(blob, state.resource_count), keep_versions
            )
            return await self._written(key, write, lambda _r: True)

        return Deferred.fromCoroutine(go())

    # -- reads that carry blobs -----------------------------------------------------------

    def get_state(self, stack_id: int, version: int | None) -> Deferred[StateBlob | None]:
        async def go() -> StateBlob | None:
            state = await self.meta.get_state(stack_id, version)
            if state is None:
                return None
            return StateBlob(await self._resolve(state.gzipped), state.resource_count)

        return Deferred.fromCoroutine(go())

    def get_deltas(self, update_id: str) -> Deferred[list[tuple[int, bytes]]]:
        async def go() -> list[tuple[int, bytes]]:
            deltas = await self.meta.get_deltas(update_id)
            bodies = await self._resolve_all([body for _seq, body in deltas])
            return [(seq, body) for (seq, _ref), body in zip(deltas, bodies, strict=True)]

        return Deferred.fromCoroutine(go())

    def get_journal(self, update_id: str, after: int = 0) -> Deferred[list[bytes]]:
        async def go() -> list[bytes]:
            return await self._resolve_all(await self.meta.get_journal(update_id, after))

        return Deferred.fromCoroutine(go())

    # -- garbage collection ---------------------------------------------------------------

    def collect(self, now: float, grace: float = GRACE_SECONDS) -> Deferred[int]:
        """Delete blobs no row references that are older than GRACE; the number deleted.
        Keys are listed before references are read: a blob listed then referenced by a row
        committed in between is younger than GRACE (rows commit within seconds of their put)."""

        async def go() -> int:
            listed: list[str] = []
            for kind in KINDS:
                listed.extend(await self.blobs.list_keys(kind + "/"))
            referenced = {ref[len(REF) :].decode() for ref in await self.meta.referenced_blobs(REF)}
            doomed = []
            for key in listed:
                made = key_time(key)
                if key not in referenced and made is not None and made < now - grace:
                    doomed.append(key)
            if doomed:
                await self.blobs.delete(doomed)
            return len(doomed)

        return Deferred.fromCoroutine(go())

    # -- everything else is metadata ------------------------------------------------------

    def get_meta(self, key: str) -> Deferred[bytes | None]:
        return self.meta.get_meta(key)

    def set_meta_if_absent(self, key: str, value: bytes) -> Deferred[bytes]:
        return self.meta.set_meta_if_absent(key, value)

    def put_meta(self, key: str, value: bytes) -> Deferred[None]:
        return self.meta.put_meta(key, value)

    def schema_version(self) -> Deferred[int]:
        return self.meta.schema_version()

    @property
    def expected_schema(self) -> int:
        return int(getattr(self.meta, "expected_schema", 0))

    def get_stack(self, ref: StackRef) -> Deferred[StackRecord | None]:
        return self.meta.get_stack(ref)

    def get_stack_or_alias(self, ref: StackRef) -> Deferred[StackRecord | None]:
        return self.meta.get_stack_or_alias(ref)

    def list_stacks(
        self,
        orgs: list[str],
        project: str | None,
        tag_name: str | None,
        tag_value: str | None,
        after: StackRef | None,
        limit: int,
    ) -> Deferred[list[StackRecord]]:
        return self.meta.list_stacks(orgs, project, tag_name, tag_value, after, limit)

    def stacks_by_id(
        self, orgs: list[str], after_id: int, limit: int
    ) -> Deferred[list[StackRecord]]:
        return self.meta.stacks_by_id(orgs, after_id, limit)

    def project_exists(self, org: str, project: str) -> Deferred[bool]:
        return self.meta.project_exists(org, project)

    def delete_stack(self, stack_id: int, force: bool) -> Deferred[None]:
        return self.meta.delete_stack(stack_id, force)

    def set_tags(self, stack_id: int, tags: dict[str, str]) -> Deferred[None]:
        return self.meta.set_tags(stack_id, tags)

    def get_stack_key(self, stack_id: int) -> Deferred[WrappedKey | None]:
        return self.meta.get_stack_key(stack_id)

    def put_stack_key_if_absent(self, stack_id: int, key: WrappedKey) -> Deferred[WrappedKey]:
        return self.meta.put_stack_key_if_absent(stack_id, key)

    def stack_keys_not_wrapped_by(
        self, key_id: str, after: int, limit: int
    ) -> Deferred[list[tuple[int, WrappedKey]]]:
        return self.meta.stack_keys_not_wrapped_by(key_id, after, limit)

    def rewrap_stack_keys(self, rows: list[tuple[int, str, WrappedKey]]) -> Deferred[int]:
        return self.meta.rewrap_stack_keys(rows)

    def count_stack_keys(self) -> Deferred[dict[str, int]]:
        return self.meta.count_stack_keys()

    def create_update(self, update: UpdateRecord) -> Deferred[None]:
        return self.meta.create_update(update)

    def get_update(self, update_id: str) -> Deferred[UpdateRecord | None]:
        return self.meta.get_update(update_id)

    def start_update(
        self,
        update_id: str,
        token_hash: str,
        now: float,
        lease_expires: float,
        tags: dict[str, str] | None,
        journal_version: int,
        engine_version: str = "",
    ) -> Deferred[UpdateRecord]:
        return self.meta.start_update(
            update_id, token_hash, now, lease_expires, tags, journal_version, engine_version
        )

    def renew_lease(
        self, update_id: str, token_hash: str, now: float, lease_expires: float
    ) -> Deferred[None]:
        return self.meta.renew_lease(update_id, token_hash, now, lease_expires)

    def check_lease(
        self, update_id: str, token_hash: str, now: float, ref: StackRef | None = None
    ) -> Deferred[UpdateRecord]:
        return self.meta.check_lease(update_id, token_hash, now, ref)

    def find_update_by_token(self, token_hash: str) -> Deferred[UpdateRecord | None]:
        return self.meta.find_update_by_token(token_hash)

    def has_deltas(self, update_id: str) -> Deferred[bool]:
        return self.meta.has_deltas(update_id)

    def journal_length(self, update_id: str) -> Deferred[int]:
        return self.meta.journal_length(update_id)

    def list_expired(self, now: float) -> Deferred[list[UpdateRecord]]:
        return self.meta.list_expired(now)

    def count_running(self, now: float) -> Deferred[tuple[int, int]]:
        return self.meta.count_running(now)

    def list_history(
        self, stack_id: int, page: int, page_size: int, previews: bool = True
    ) -> Deferred[list[UpdateRecord]]:
        return self.meta.list_history(stack_id, page, page_size, previews)

    def get_update_by_version(self, stack_id: int, version: int) -> Deferred[UpdateRecord | None]:
        return self.meta.get_update_by_version(stack_id, version)

    def prune(self, rules: RetentionRules) -> Deferred[dict[str, int]]:
        return self.meta.prune(rules)

    def claim(self, name: str, holder: str, now: float, until: float) -> Deferred[bool]:
        return self.meta.claim(name, holder, now, until)

    def referenced_blobs(self, prefix: bytes) -> Deferred[list[bytes]]:
        return self.meta.referenced_blobs(prefix)

    def append_events(
        self,
        batches: list[tuple[str, list[StoredEvent]]],
        summaries: dict[str, dict[str, int]],
    ) -> Deferred[None]:
        return self.meta.append_events(batches, summaries)

    def get_events(self, update_id: str, after: int, limit: int) -> Deferred[list[StoredEvent]]:
        return self.meta.get_events(update_id, after, limit)

    def put_identity(self, identity: IdentityRecord) -> Deferred[None]:
        return self.meta.put_identity(identity)

    def get_identity(self, login: str) -> Deferred[IdentityRecord | None]:
        return self.meta.get_identity(login)

    def list_identities(self) -> Deferred[list[IdentityRecord]]:
        return self.meta.list_identities()

    def create_token(self, token: TokenRecord) -> Deferred[None]:
        return self.meta.create_token(token)

    def find_token(self, token_hash: str) -> Deferred[TokenRecord | None]:
        return self.meta.find_token(token_hash)

    def list_tokens(self, login: str | None) -> Deferred[list[TokenRecord]]:
        return self.meta.list_tokens(login)

    def delete_token(self, token_id: str, login: str | None) -> Deferred[bool]:
        return self.meta.delete_token(token_id, login)

    def delete_tokens_of(self, login: str) -> Deferred[int]:
        return self.meta.delete_tokens_of(login)

    def touch_tokens(self, last_used: dict[str, float]) -> Deferred[None]:
        return self.meta.touch_tokens(last_used)

    def add_audit_events(self, events: list[AuditRecord]) -> Deferred[None]:
        return self.meta.add_audit_events(events)

    def list_audit_events(
        self,
        org: str,
        start: float | None,
        end: float | None,
        actor: str | None,
        action: str | None,
        before_id: int,
        limit: int,
    ) -> Deferred[list[AuditRecord]]:
        return self.meta.list_audit_events(org, start, end, actor, action, before_id, limit)
