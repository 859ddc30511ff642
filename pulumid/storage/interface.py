"""The storage seam. SQLite implements it today; PostgreSQL + S3 will implement it later.

Operations are coarse and domain-shaped ("start this update unless another holds the stack"),
so each one is a single transaction in any backend. Conflicts surface as PulumidError
subclasses, never as backend errors: a storage failure is `Unavailable` (503), raised after
the transaction was rolled back, and leaves the store usable. Every method returns a Deferred.

Update tokens cross this seam only as hashes (`token_hash`), compared in constant time.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

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


class Store(Protocol):
    # Only this process writes it (an embedded database): what a node caches of it cannot
    # lag behind another node's writes.
    exclusive: bool

    # meta
    def get_meta(self, key: str) -> Deferred[bytes | None]: ...
    def set_meta_if_absent(self, key: str, value: bytes) -> Deferred[bytes]: ...
    def put_meta(self, key: str, value: bytes) -> Deferred[None]: ...  # insert or replace
    def schema_version(self) -> Deferred[int]: ...  # the database's schema version

    # stacks
    def create_stack(
        self, ref: StackRef, tags: dict[str, str], now: float, initial: StateBlob | None
    ) -> Deferred[StackRecord]: ...
    def get_stack(self, ref: StackRef) -> Deferred[StackRecord | None]: ...
    def get_stack_or_alias(self, ref: StackRef) -> Deferred[StackRecord | None]: ...
    def list_stacks(
        self,
        orgs: list[str],
        project: str | None,
        tag_name: str | None,
        tag_value: str | None,
        after: StackRef | None,
        limit: int,
    ) -> Deferred[list[StackRecord]]:
        """A page of stacks in (org, project, name) order, those after AFTER."""
        ...

    def stacks_by_id(
        self, orgs: list[str], after_id: int, limit: int
    ) -> Deferred[list[StackRecord]]:
        """A page of stacks in id order (copying and comparing two stores)."""
        ...

    def project_exists(self, org: str, project: str) -> Deferred[bool]: ...
    def delete_stack(self, stack_id: int, force: bool) -> Deferred[None]: ...
    def set_tags(self, stack_id: int, tags: dict[str, str]) -> Deferred[None]: ...
    def rename_stack(
        self,
        stack_id: int,
        new_ref: StackRef,
        expected_version: int,
        state: StateBlob | None,
        update: UpdateRecord | None,
        keep_versions: int,
    ) -> Deferred[None]: ...
    def get_state(self, stack_id: int, version: int | None) -> Deferred[StateBlob | None]: ...

    # per-stack secrets keys, each wrapped by a key of the keyring (named by its key id)
    def get_stack_key(self, stack_id: int) -> Deferred[WrappedKey | None]: ...
    def put_stack_key_if_absent(self, stack_id: int, key: WrappedKey) -> Deferred[WrappedKey]: ...
    # Stack keys wrapped by another key than KEY_ID, in stack id order after AFTER.
    def stack_keys_not_wrapped_by(
        self, key_id: str, after: int, limit: int
    ) -> Deferred[list[tuple[int, WrappedKey]]]: ...
    # Replace (stack id, key wrapped by OLD key id, new key) where still wrapped by OLD: count.
    def rewrap_stack_keys(self, rows: list[tuple[int, str, WrappedKey]]) -> Deferred[int]: ...
    def count_stack_keys(self) -> Deferred[dict[str, int]]: ...  # key id -> stacks

    # updates
    def create_update(self, update: UpdateRecord) -> Deferred[None]: ...
    def get_update(self, update_id: str) -> Deferred[UpdateRecord | None]: ...
    def start_update(
        self,
        update_id: str,
        token_hash: str,
        now: float,
        lease_expires: float,
        tags: dict[str, str] | None,
        journal_version: int,
        engine_version: str = "",
    ) -> Deferred[UpdateRecord]: ...
    def renew_lease(
        self, update_id: str, token_hash: str, now: float, lease_expires: float
    ) -> Deferred[None]: ...
    def check_lease(
        self, update_id: str, token_hash: str, now: float, ref: StackRef | None = None
    ) -> Deferred[UpdateRecord]:
        """The running update's record if `token_hash` holds its live lease (and, given `ref`,
        the update belongs to that stack): else NotFound, Forbidden or Conflict."""

    def find_update_by_token(self, token_hash: str) -> Deferred[UpdateRecord | None]: ...

    # Checkpoint writes are monotonic: a sequence at or below the stored one is ignored
    # (False). Journaling updates refuse them (Conflict).
    def save_checkpoint(
        self, update_id: str, token_hash: str, now: float, state: StateBlob, sequence: int = 0
    ) -> Deferred[bool]: ...
    def save_delta(
        self, update_id: str, token_hash: str, now: float, sequence: int, body: bytes
    ) -> Deferred[bool]: ...
    def has_deltas(self, update_id: str) -> Deferred[bool]: ...
    def get_deltas(self, update_id: str) -> Deferred[list[tuple[int, bytes]]]: ...
    # Appends a batch and returns its number (1, 2, ...); with `after`, only if the journal
    # still has that many batches (else Stale): nodes caching a replayer stay in step.
    def append_journal(
        self,
        update_id: str,
        token_hash: str,
        now: float,
        body: bytes,
        after: int | None = None,
    ) -> Deferred[int]: ...
    def journal_length(self, update_id: str) -> Deferred[int]: ...
    # The batches after the first AFTER (batches are numbered from 1), in order.
    def get_journal(self, update_id: str, after: int = 0) -> Deferred[list[bytes]]: ...
    # Ending an update: `state` becomes version N when given; `failure` records why the
    # server ended it (complete then ends it failed whatever the CLI said).
    def complete_update(
        self,
        update_id: str,
        token_hash: str,
        now: float,
        status: str,
        keep_versions: int,
        state: StateBlob | None = None,
        failure: str | None = None,
    ) -> Deferred[None]: ...
    def cancel_update(
        self,
        update_id: str,
        now: float,
        state: StateBlob | None = None,
        keep_versions: int = 0,
        failure: str | None = None,
    ) -> Deferred[None]: ...
    def list_expired(self, now: float) -> Deferred[list[UpdateRecord]]: ...
    # (running updates, those of them whose lease is live at NOW): metrics.
    def count_running(self, now: float) -> Deferred[tuple[int, int]]: ...
    def expire_update(
        self,
        update_id: str,
        now: float,
        state: StateBlob | None = None,
        keep_versions: int = 0,
        failure: str | None = None,
    ) -> Deferred[bool]: ...
    def import_state(
        self, update: UpdateRecord, state: StateBlob, keep_versions: int
    ) -> Deferred[int]: ...
    def list_history(
        self, stack_id: int, page: int, page_size: int, previews: bool = True
    ) -> Deferred[list[UpdateRecord]]: ...
    def get_update_by_version(
        self, stack_id: int, version: int
    ) -> Deferred[UpdateRecord | None]: ...

    # retention
    def prune(self, rules: RetentionRules) -> Deferred[dict[str, int]]: ...

    # Timed work shared by nodes: NAME is claimed by HOLDER until UNTIL unless another holder's
    # claim is still live at NOW. True when HOLDER has it (again); one holder at a time.
    def claim(self, name: str, holder: str, now: float, until: float) -> Deferred[bool]: ...
    # Every stored state, journal batch and delta body that starts with PREFIX (blob references).
    def referenced_blobs(self, prefix: bytes) -> Deferred[list[bytes]]: ...

    # engine events
    def append_events(
        self,
        batches: list[tuple[str, list[StoredEvent]]],
        summaries: dict[str, dict[str, int]],
    ) -> Deferred[None]: ...
    def get_events(self, update_id: str, after: int, limit: int) -> Deferred[list[StoredEvent]]: ...

    # identities (who signed in, their groups, the provider's encrypted refresh token)
    def put_identity(self, identity: IdentityRecord) -> Deferred[None]: ...  # insert or replace
    def get_identity(self, login: str) -> Deferred[IdentityRecord | None]: ...
    def list_identities(self) -> Deferred[list[IdentityRecord]]: ...  # ordered by login

    # access tokens (hashes only)
    def create_token(self, token: TokenRecord) -> Deferred[None]: ...
    def find_token(self, token_hash: str) -> Deferred[TokenRecord | None]: ...
    # LOGIN's tokens, or everyone's when None; newest first.
    def list_tokens(self, login: str | None) -> Deferred[list[TokenRecord]]: ...
    # False when there is no such token (of LOGIN, when LOGIN is given).
    def delete_token(self, token_id: str, login: str | None) -> Deferred[bool]: ...
    def delete_tokens_of(self, login: str) -> Deferred[int]: ...
    # Raise last_used (never lower it) for many tokens in one transaction.
    def touch_tokens(self, last_used: dict[str, float]) -> Deferred[None]: ...

    # audit trail
    def add_audit_events(self, events: list[AuditRecord]) -> Deferred[None]: ...
    # Newest first; BEFORE_ID pages (0: from the newest); times are epoch seconds, inclusive.
    def list_audit_events(
        self,
        org: str,
        start: float | None,
        end: float | None,
        actor: str | None,
        action: str | None,
        before_id: int,
        limit: int,
    ) -> Deferred[list[AuditRecord]]: ...

    def close(self) -> None: ...
