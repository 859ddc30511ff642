"""The Store operations over SQL, once for SQLite and PostgreSQL: `SQLStore`.

Every public method hands a transaction function to the store's runner: `_read` runs it as it
comes, `_write` as one transaction. These functions run on a runner thread, never touch the
reactor, and return plain values. The SQL is written with `?` placeholders and in the SQL both
engines accept; a store supplies what is really its own: how it connects and runs a
transaction, which errors mean "unavailable", and the row locks it needs (none in SQLite,
whose writers are serialised; PostgreSQL's are in postgres.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

from twisted.internet.defer import Deferred, succeed

from pulumid.auth.tokens import same
from pulumid.errors import BadRequest, Conflict, Forbidden, NotFound, Stale
from pulumid.storage.faults import Faults
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
from pulumid.storage.rows import (
    ANOTHER_UPDATE,
    AUDIT_COLUMNS,
    AUDIT_INSERT_COLUMNS,
    BLOB_COLUMNS,
    IDENTITY_COLUMNS,
    RETENTION_KINDS,
    STACK_COLUMNS,
    STACK_HAS_RESOURCES,
    TOKEN_COLUMNS,
    UPDATE_COLUMN_COUNT,
    UPDATE_COLUMNS,
    audit_from_row,
    audit_values,
    check_checkpointing,
    check_lease,
    check_writable,
    claim_statement,
    identity_from_row,
    identity_values,
    not_running_message,
    placeholders,
    retention_deletes,
    stack_from_row,
    token_from_row,
    token_values,
    update_from_row,
    update_values,
)
from pulumid.threads import Runner

T = TypeVar("T")

# Parameters: org, project, name, created, resource_count.
INSERT_STACK = (
    "INSERT INTO stacks (org, project, name, created, resource_count) VALUES (?, ?, ?, ?, ?)"
)
# An identity signing in again replaces every field: the provider's word is the newest.
PUT_IDENTITY = (
    f"INSERT INTO identities ({IDENTITY_COLUMNS}) VALUES ({placeholders(IDENTITY_COLUMNS)}) "
    "ON CONFLICT (login) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in IDENTITY_COLUMNS.split(", ")[1:])
)


class SchemaTooNew(Exception):
    """The database was migrated by a newer pulumid."""


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What the transaction functions use: sqlite3's Connection, or psycopg's adapted."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Cursor: ...
    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> object: ...


class SQLStore:
    """The Store operations; a subclass supplies the connection and the hooks below."""

    # What a statement that breaks a UNIQUE constraint raises.
    unique_violation: ClassVar[type[Exception]]
    # Tags are read for at most this many stacks per statement.
    in_batch: ClassVar[int]
    exclusive = False

    def __init__(self, runner: Runner, faults: Faults | None) -> None:
        self._runner = runner
        self.faults = faults or Faults()

    def close(self) -> None:
        raise NotImplementedError

    # -- what each database does its own way -----------------------------------------------

    def _reading(self, f: Callable[..., T], *args: Any) -> T:
        """F(connection, *ARGS) outside a write transaction; storage errors are Unavailable."""
        raise NotImplementedError

    def _in_transaction(self, f: Callable[..., T], *args: Any) -> T:
        """F(connection, *ARGS) in one write transaction, with the commit and rollback fault
        points; storage errors are Unavailable, after the rollback."""
        raise NotImplementedError

    def _row_lock(self, mode: str) -> str:
        """What ends a SELECT to lock the rows it reads in MODE (`FOR UPDATE` etc.)."""
        raise NotImplementedError

    def _lock_update(self, conn: Connection, update_id: str) -> UpdateRecord | None:
        """The update, locked against other writers (with its stack first), or None."""
        raise NotImplementedError

    def _insert_stack(self, conn: Connection, values: Sequence[Any]) -> int | None:
        """The id of a new stack row (INSERT_STACK with VALUES), None if the name is taken."""
        raise NotImplementedError

    def _in(self, column: str, values: list[Any]) -> tuple[str, list[Any]]:
        """`COLUMN is one of VALUES` as SQL, and its parameters."""
        raise NotImplementedError

    # -- plumbing -------------------------------------------------------------------------

    # The schema version this code was written for (readiness compares the database's).
    expected_schema: ClassVar[int] = 0
    # Told how long each call took on its thread (name of the operation, seconds): metrics.
    timing: Callable[[str, float], None] | None = None
    # pulumid.ops.tracing.Tracing when traces are on: a span per call, under the caller's.
    tracing: Any = None

    def _read(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._call(self._reading, f, args)

    def _write(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._call(self._in_transaction, f, args)

    def _call(
        self, how: Callable[..., T], f: Callable[..., T], args: tuple[Any, ...]
    ) -> Deferred[T]:
        parent = self.tracing.current() if self.tracing is not None else None
        return self._runner.run(self._timed, how, f, parent, *args)

    def _timed(self, how: Callable[..., T], f: Callable[..., T], parent: Any, *args: Any) -> T:
        timing, tracing = self.timing, self.tracing
        if timing is None and tracing is None:
            return how(f, *args)
        name = _operation(f)
        started = time.perf_counter()
        try:
            if tracing is not None:
                with tracing.database(name, parent):
                    return how(f, *args)
            return how(f, *args)
        finally:
            if timing is not None:
                timing(name, time.perf_counter() - started)

    # -- meta -----------------------------------------------------------------------------

    def get_meta(self, key: str) -> Deferred[bytes | None]:
        def txn(conn: Connection) -> bytes | None:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return bytes(row[0]) if row else None

        return self._read(txn)

    def set_meta_if_absent(self, key: str, value: bytes) -> Deferred[bytes]:
        def txn(conn: Connection) -> bytes:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                (key, value),
            )
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return bytes(row[0])

        return self._write(txn)

    def schema_version(self) -> Deferred[int]:
        def txn(conn: Connection) -> int:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                return 0
            value = row[0]
            return int(value if isinstance(value, str | int) else bytes(value).decode())

        return self._read(txn)

    def put_meta(self, key: str, value: bytes) -> Deferred[None]:
        def txn(conn: Connection) -> None:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

        return self._write(txn)

    # -- stacks ---------------------------------------------------------------------------

    def create_stack(
        self, ref: StackRef, tags: dict[str, str], now: float, initial: StateBlob | None
    ) -> Deferred[StackRecord]:
        def txn(conn: Connection) -> StackRecord:
            resource_count = initial.resource_count if initial else None
            values = (ref.org, ref.project, ref.name, int(now), resource_count)
            stack_id = self._insert_stack(conn, values)
            if stack_id is None:
                raise Conflict(f"Conflict: stack '{ref}' already exists")
            _write_tags(conn, stack_id, tags)
            conn.execute(
                "DELETE FROM stack_aliases WHERE org = ? AND project = ? AND name = ?",
                (ref.org, ref.project, ref.name),
            )
            if initial is not None:
                conn.execute(
                    "INSERT INTO states (stack_id, version, data, resource_count) "
                    "VALUES (?, 0, ?, ?)",
                    (stack_id, initial.gzipped, initial.resource_count),
                )
            return self._get_stack_by_id(conn, stack_id)

        return self._write(txn)

    def get_stack(self, ref: StackRef) -> Deferred[StackRecord | None]:
        return self._read(self._get_stack_by_ref, ref, False)

    def get_stack_or_alias(self, ref: StackRef) -> Deferred[StackRecord | None]:
        return self._read(self._get_stack_by_ref, ref, True)

    def list_stacks(
        self,
        orgs: list[str],
        project: str | None,
        tag_name: str | None,
        tag_value: str | None,
        after: StackRef | None,
        limit: int,
    ) -> Deferred[list[StackRecord]]:
        # Pages in the order the CLI sorts stacks: its sort is then linear, where shuffled
        # input took most of `stack ls` with 20,000 stacks. One range scan of the (org,
        # project, name) index per organization: a row-value bound over all three columns
        # is not used as a range, and each page would scan from the first stack.
        def txn(conn: Connection) -> list[StackRecord]:
            rows: list[Any] = []
            for org in sorted(set(orgs)):
                if after is not None and org < after.org:
                    continue
                sql = [f"SELECT {STACK_COLUMNS} FROM stacks s WHERE org = ?"]
                args: list[Any] = [org]
                if after is not None and org == after.org:
                    sql.append("AND (project, name) > (?, ?)")
                    args.extend((after.project, after.name))
                if project is not None:
                    sql.append("AND project = ?")
                    args.append(project)
                if tag_name is not None:
                    sql.append(
                        "AND EXISTS (SELECT 1 FROM stack_tags t WHERE t.stack_id = s.id "
                        "AND t.name = ?" + (" AND t.value = ?)" if tag_value is not None else ")")
                    )
                    args.append(tag_name)
                    if tag_value is not None:
                        args.append(tag_value)
                sql.append("ORDER BY project, name LIMIT ?")
                args.append(limit - len(rows))
                rows.extend(conn.execute(" ".join(sql), args).fetchall())
                if len(rows) >= limit:
                    break
            return self._with_tags(conn, rows)

        return self._read(txn)

    def stacks_by_id(
        self, orgs: list[str], after_id: int, limit: int
    ) -> Deferred[list[StackRecord]]:
        def txn(conn: Connection) -> list[StackRecord]:
            in_orgs, org_args = self._in("org", list(orgs))
            sql = (
                f"SELECT {STACK_COLUMNS} FROM stacks s WHERE id > ? AND {in_orgs} "
                "ORDER BY id LIMIT ?"
            )
            return self._with_tags(conn, conn.execute(sql, [after_id, *org_args, limit]).fetchall())

        return self._read(txn)

    def _with_tags(self, conn: Connection, rows: list[Any]) -> list[StackRecord]:
        tags = self._read_tags(conn, [row[0] for row in rows])
        return [stack_from_row(row, tags.get(row[0], {})) for row in rows]

    def project_exists(self, org: str, project: str) -> Deferred[bool]:
        def txn(conn: Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM stacks WHERE org = ? AND project = ? LIMIT 1", (org, project)
            ).fetchone()
            return row is not None

        return self._read(txn)

    def delete_stack(self, stack_id: int, force: bool) -> Deferred[None]:
        def txn(conn: Connection) -> None:
            stack = self._lock_stack(conn, stack_id, "FOR UPDATE")
            if not force and (stack.resource_count or 0) > 0:
                raise BadRequest(STACK_HAS_RESOURCES)
            if stack.locked_by and not force:
                raise Conflict(ANOTHER_UPDATE)
            conn.execute("DELETE FROM stacks WHERE id = ?", (stack_id,))

        return self._write(txn)

    def set_tags(self, stack_id: int, tags: dict[str, str]) -> Deferred[None]:
        def txn(conn: Connection) -> None:
            self._lock_stack(conn, stack_id)
            _write_tags(conn, stack_id, tags)

        return self._write(txn)

    def rename_stack(
        self,
        stack_id: int,
        new_ref: StackRef,
        expected_version: int,
        state: StateBlob | None,
        update: UpdateRecord | None,
        keep_versions: int,
    ) -> Deferred[None]:
        def txn(conn: Connection) -> None:
            stack = self._lock_stack(conn, stack_id)
            if stack.locked_by:
                raise Conflict(ANOTHER_UPDATE)
            if stack.version != expected_version:
                raise Conflict("Conflict: the stack changed during the rename; try again")
            taken = conn.execute(
                "SELECT 1 FROM stacks WHERE org = ? AND project = ? AND name = ?",
                (new_ref.org, new_ref.project, new_ref.name),
            ).fetchone()
            if taken:
                raise Conflict(f"Conflict: stack '{new_ref}' already exists")
            conn.execute(
                "DELETE FROM stack_aliases WHERE org = ? AND project = ? AND name = ?",
                (new_ref.org, new_ref.project, new_ref.name),
            )
            conn.execute(
                "INSERT INTO stack_aliases (org, project, name, stack_id) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (org, project, name) DO UPDATE SET stack_id = excluded.stack_id",
                (stack.org, stack.project, stack.name, stack_id),
            )
            try:
                # Another node may have created or renamed a stack to the name meanwhile.
                conn.execute(
                    "UPDATE stacks SET project = ?, name = ? WHERE id = ?",
                    (new_ref.project, new_ref.name, stack_id),
                )
            except self.unique_violation:
                raise Conflict(f"Conflict: stack '{new_ref}' already exists") from None
            if state is not None and update is not None:
                version = stack.version + 1
                _insert_update(conn, update, status="succeeded", version=version)
                _put_state(conn, stack_id, version, state)
                conn.execute(
                    "UPDATE stacks SET version = ?, last_update = ?, last_update_time = ? "
                    "WHERE id = ?",
                    (version, update.id, int(update.end_time or update.created), stack_id),
                )
                _prune(conn, stack_id, version, keep_versions)

        return self._write(txn)

    def get_state(self, stack_id: int, version: int | None) -> Deferred[StateBlob | None]:
        def txn(conn: Connection) -> StateBlob | None:
            if version is None:
                row = conn.execute(
                    "SELECT st.data, st.resource_count FROM states st JOIN stacks s "
                    "ON s.id = st.stack_id AND s.version = st.version WHERE s.id = ?",
                    (stack_id,),
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT data, resource_count FROM states WHERE stack_id = ? AND version = ?",
                    (stack_id, version),
                ).fetchone()
            return StateBlob(bytes(row[0]), row[1]) if row else None

        return self._read(txn)

    # -- secrets keys ---------------------------------------------------------------------

    def get_stack_key(self, stack_id: int) -> Deferred[WrappedKey | None]:
        def txn(conn: Connection) -> WrappedKey | None:
            row = conn.execute(
                "SELECT key_id, wrapped FROM stack_keys WHERE stack_id = ?", (stack_id,)
            ).fetchone()
            return WrappedKey(row[0], bytes(row[1])) if row else None

        return self._read(txn)

    def put_stack_key_if_absent(self, stack_id: int, key: WrappedKey) -> Deferred[WrappedKey]:
        def txn(conn: Connection) -> WrappedKey:
            conn.execute(
                "INSERT INTO stack_keys (stack_id, key_id, wrapped) VALUES (?, ?, ?) "
                "ON CONFLICT (stack_id) DO NOTHING",
                (stack_id, key.key_id, key.wrapped),
            )
            row = conn.execute(
                "SELECT key_id, wrapped FROM stack_keys WHERE stack_id = ?", (stack_id,)
            ).fetchone()
            return WrappedKey(row[0], bytes(row[1]))

        return self._write(txn)

    def stack_keys_not_wrapped_by(
        self, key_id: str, after: int, limit: int
    ) -> Deferred[list[tuple[int, WrappedKey]]]:
        def txn(conn: Connection) -> list[tuple[int, WrappedKey]]:
            rows = conn.execute(
                "SELECT stack_id, key_id, wrapped FROM stack_keys "
                "WHERE key_id <> ? AND stack_id > ? ORDER BY stack_id LIMIT ?",
                (key_id, after, limit),
            ).fetchall()
            return [(row[0], WrappedKey(row[1], bytes(row[2]))) for row in rows]

        return self._read(txn)

    def rewrap_stack_keys(self, rows: list[tuple[int, str, WrappedKey]]) -> Deferred[int]:
        def txn(conn: Connection) -> int:
            # Only where the old key still wraps it: another node may have been first.
            changed = 0
            for stack_id, old_key_id, key in rows:
                changed += conn.execute(
                    "UPDATE stack_keys SET key_id = ?, wrapped = ? "
                    "WHERE stack_id = ? AND key_id = ?",
                    (key.key_id, key.wrapped, stack_id, old_key_id),
                ).rowcount
            return changed

        return self._write(txn)

    def count_stack_keys(self) -> Deferred[dict[str, int]]:
        def txn(conn: Connection) -> dict[str, int]:
            rows = conn.execute("SELECT key_id, COUNT(*) FROM stack_keys GROUP BY key_id")
            return {row[0]: int(row[1]) for row in rows.fetchall()}

        return self._read(txn)

    # -- updates --------------------------------------------------------------------------

    def create_update(self, update: UpdateRecord) -> Deferred[None]:
        def txn(conn: Connection) -> None:
            # A key-share lock: the stack cannot be deleted before the insert commits.
            self._lock_stack(conn, update.stack_id, "FOR KEY SHARE")
            _insert_update(conn, update, status=update.status, version=update.version)

        return self._write(txn)

    def get_update(self, update_id: str) -> Deferred[UpdateRecord | None]:
        return self._read(find_update, update_id)

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
        def txn(conn: Connection) -> UpdateRecord:
            update = self._lock_update(conn, update_id)
            if update is None:
                raise NotFound("Not Found: update not found")
            if update.status != "not-started":
                raise Conflict("Conflict: The Update has already been started.")
            stack = self._get_stack_by_id(conn, update.stack_id)  # locked by _lock_update
            version = stack.version
            if not update.dry_run:
                _take_over(conn, stack, now)
                version = stack.version + 1
                # Version N starts as a copy of N-1: export works before any checkpoint, and
                # it is the base that journal entries are replayed onto.
                conn.execute(
                    "INSERT INTO states (stack_id, version, data, resource_count) "
                    "SELECT stack_id, ?, data, resource_count FROM states "
                    "WHERE stack_id = ? AND version = ? "
                    "ON CONFLICT (stack_id, version) DO UPDATE "
                    "SET data = excluded.data, resource_count = excluded.resource_count",
                    (version, stack.id, stack.version),
                )
                conn.execute(
                    "UPDATE stacks SET version = ?, locked_by = ?, last_update = ? WHERE id = ?",
                    (version, update_id, update_id, stack.id),
                )
            if tags is not None:
                _write_tags(conn, stack.id, tags)
            conn.execute(
                "UPDATE updates SET status = 'running', token_hash = ?, lease_expires = ?, "
                "start_time = ?, version = ?, journal_version = ?, engine_version = ? "
                "WHERE id = ?",
                (
                    token_hash,
                    lease_expires,
                    now,
                    version,
                    journal_version,
                    engine_version,
                    update_id,
                ),
            )
            started = find_update(conn, update_id)
            assert started is not None
            return started

        return self._write(txn)

    def check_lease(
        self, update_id: str, token_hash: str, now: float, ref: StackRef | None = None
    ) -> Deferred[UpdateRecord]:
        def txn(conn: Connection) -> UpdateRecord:
            if ref is not None:
                row = conn.execute(
                    "SELECT 1 FROM updates u JOIN stacks s ON s.id = u.stack_id "
                    "WHERE u.id = ? AND s.org = ? AND s.project = ? AND s.name = ?",
                    (update_id, ref.org, ref.project, ref.name),
                ).fetchone()
                if row is None:
                    raise NotFound(f"Not Found: update '{update_id}' not found")
            return check_lease(find_update(conn, update_id), token_hash, now)

        return self._read(txn)

    def renew_lease(
        self, update_id: str, token_hash: str, now: float, lease_expires: float
    ) -> Deferred[None]:
        def txn(conn: Connection) -> None:
            check_lease(self._lock_update(conn, update_id), token_hash, now)
            conn.execute(
                "UPDATE updates SET lease_expires = ? WHERE id = ?", (lease_expires, update_id)
            )

        return self._write(txn)

    def save_checkpoint(
        self, update_id: str, token_hash: str, now: float, state: StateBlob, sequence: int = 0
    ) -> Deferred[bool]:
        def txn(conn: Connection) -> bool:
            update = check_checkpointing(self._lock_update(conn, update_id), token_hash, now)
            if sequence and sequence <= update.checkpoint_seq:
                return False  # a late retry must not roll the state back
            _put_state(conn, update.stack_id, update.version, state)
            conn.execute(
                "UPDATE stacks SET resource_count = ? WHERE id = ? AND version = ?",
                (state.resource_count, update.stack_id, update.version),
            )
            # A full state supersedes the deltas saved before it.
            conn.execute("DELETE FROM checkpoint_deltas WHERE update_id = ?", (update_id,))
            conn.execute(
                "UPDATE updates SET checkpoint_seq = ? WHERE id = ? AND checkpoint_seq < ?",
                (sequence, update_id, sequence),
            )
            return True

        return self._write(txn)

    def save_delta(
        self, update_id: str, token_hash: str, now: float, sequence: int, body: bytes
    ) -> Deferred[bool]:
        def txn(conn: Connection) -> bool:
            update = check_checkpointing(self._lock_update(conn, update_id), token_hash, now)
            if sequence <= update.checkpoint_seq:
                return False
            conn.execute(
                "INSERT INTO checkpoint_deltas (update_id, seq, body) VALUES (?, ?, ?) "
                "ON CONFLICT (update_id, seq) DO UPDATE SET body = excluded.body",
                (update_id, sequence, body),
            )
            conn.execute(
                "UPDATE updates SET checkpoint_seq = ? WHERE id = ?", (sequence, update_id)
            )
            return True

        return self._write(txn)

    def has_deltas(self, update_id: str) -> Deferred[bool]:
        def txn(conn: Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM checkpoint_deltas WHERE update_id = ? LIMIT 1", (update_id,)
            ).fetchone()
            return row is not None

        return self._read(txn)

    def get_deltas(self, update_id: str) -> Deferred[list[tuple[int, bytes]]]:
        def txn(conn: Connection) -> list[tuple[int, bytes]]:
            rows = conn.execute(
                "SELECT seq, body FROM checkpoint_deltas WHERE update_id = ? ORDER BY seq",
                (update_id,),
            ).fetchall()
            return [(row[0], bytes(row[1])) for row in rows]

        return self._read(txn)

    def append_journal(
        self,
        update_id: str,
        token_hash: str,
        now: float,
        body: bytes,
        after: int | None = None,
    ) -> Deferred[int]:
        def txn(conn: Connection) -> int:
            # The lock makes the length read below and the insert one step across nodes.
            update = check_writable(self._lock_update(conn, update_id), token_hash, now)
            if not update.journal_version:
                raise BadRequest("Bad Request: journaling was not enabled for this update")
            length = _journal_length(conn, update_id)
            if after is not None and after != length:
                raise Stale("Conflict: the update's journal moved on; retry the request")
            conn.execute(
                "INSERT INTO journal_batches (update_id, batch, body) VALUES (?, ?, ?)",
                (update_id, length + 1, body),
            )
            return length + 1

        return self._write(txn)

    def journal_length(self, update_id: str) -> Deferred[int]:
        return self._read(_journal_length, update_id)

    def get_journal(self, update_id: str, after: int = 0) -> Deferred[list[bytes]]:
        def txn(conn: Connection) -> list[bytes]:
            rows = conn.execute(
                "SELECT body FROM journal_batches WHERE update_id = ? AND batch > ? ORDER BY batch",
                (update_id, after),
            ).fetchall()
            return [bytes(row[0]) for row in rows]

        return self._read(txn)

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
        """End the update as the CLI says; with `failure`, as failed and for that reason."""

        def txn(conn: Connection) -> None:
            update = self._lock_update(conn, update_id)
            if update is None or not same(update.token_hash or "", token_hash):
                raise Forbidden("Forbidden: the update token is not valid for this update")
            final = "failed" if failure else status
            if update.status == final:
                return  # a retried complete that already took effect
            if update.status != "running":
                raise Conflict(not_running_message(update.status))
            _finish(conn, update, final, now, state, keep_versions, failure)

        return self._write(txn)

    def cancel_update(
        self,
        update_id: str,
        now: float,
        state: StateBlob | None = None,
        keep_versions: int = 0,
        failure: str | None = None,
    ) -> Deferred[None]:
        def txn(conn: Connection) -> None:
            update = self._lock_update(conn, update_id)
            if update is None:
                raise NotFound("Not Found: update not found")
            if update.status != "running":
                raise Conflict(not_running_message(update.status))
            _finish(conn, update, "cancelled", now, state, keep_versions, failure)

        return self._write(txn)

    def list_expired(self, now: float) -> Deferred[list[UpdateRecord]]:
        def txn(conn: Connection) -> list[UpdateRecord]:
            rows = conn.execute(
                f"SELECT {UPDATE_COLUMNS} FROM updates "
                "WHERE status = 'running' AND lease_expires <= ?",
                (now,),
            ).fetchall()
            return [update_from_row(row) for row in rows]

        return self._read(txn)

    def count_running(self, now: float) -> Deferred[tuple[int, int]]:
        def txn(conn: Connection) -> tuple[int, int]:
            row = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN lease_expires > ? THEN 1 ELSE 0 END), 0) "
                "FROM updates WHERE status = 'running'",
                (now,),
            ).fetchone()
            return int(row[0]), int(row[1])

        return self._read(txn)

    def expire_update(
        self,
        update_id: str,
        now: float,
        state: StateBlob | None = None,
        keep_versions: int = 0,
        failure: str | None = None,
    ) -> Deferred[bool]:
        def txn(conn: Connection) -> bool:
            update = self._lock_update(conn, update_id)
            if update is None or update.status != "running" or (update.lease_expires or 0) > now:
                return False  # renewed, finished or taken over meanwhile
            _finish(conn, update, "failed", now, state, keep_versions, failure)
            return True

        return self._write(txn)

    def import_state(
        self, update: UpdateRecord, state: StateBlob, keep_versions: int
    ) -> Deferred[int]:
        def txn(conn: Connection) -> int:
            stack = self._lock_stack(conn, update.stack_id)
            now = update.created
            _take_over(conn, stack, now)
            version = stack.version + 1
            _insert_update(conn, update, status="succeeded", version=version)
            _put_state(conn, stack.id, version, state)
            conn.execute(
                "UPDATE stacks SET version = ?, last_update = ?, last_update_time = ?, "
                "resource_count = ? WHERE id = ?",
                (version, update.id, int(now), state.resource_count, stack.id),
            )
            _prune(conn, stack.id, version, keep_versions)
            return version

        return self._write(txn)

    def list_history(
        self, stack_id: int, page: int, page_size: int, previews: bool = True
    ) -> Deferred[list[UpdateRecord]]:
        """Newest first; page 0 is every entry. Previews are listed unless `previews` is off."""

        def txn(conn: Connection) -> list[UpdateRecord]:
            sql = (
                f"SELECT {UPDATE_COLUMNS} FROM updates WHERE stack_id = ? "
                "AND status != 'not-started'"
                + ("" if previews else " AND dry_run = FALSE")
                + " ORDER BY version DESC, created DESC"
            )
            args: tuple[Any, ...] = (stack_id,)
            if page > 0:
                sql += " LIMIT ? OFFSET ?"
                args = (stack_id, page_size, (page - 1) * page_size)
            return [update_from_row(row) for row in conn.execute(sql, args).fetchall()]

        return self._read(txn)

    def get_update_by_version(self, stack_id: int, version: int) -> Deferred[UpdateRecord | None]:
        def txn(conn: Connection) -> UpdateRecord | None:
            row = conn.execute(
                f"SELECT {UPDATE_COLUMNS} FROM updates WHERE stack_id = ? AND version = ? "
                "AND dry_run = FALSE AND status != 'not-started' ORDER BY created DESC LIMIT 1",
                (stack_id, version),
            ).fetchone()
            return update_from_row(row) if row else None

        return self._read(txn)

    def find_update_by_token(self, token_hash: str) -> Deferred[UpdateRecord | None]:
        """The update (running or ended) whose token hashes to `token_hash`, if any."""

        def txn(conn: Connection) -> UpdateRecord | None:
            row = conn.execute(
                f"SELECT {UPDATE_COLUMNS} FROM updates WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
            return update_from_row(row) if row else None

        return self._read(txn)

    def prune(self, rules: RetentionRules) -> Deferred[dict[str, int]]:
        """Delete what retention lets go of; one transaction, counts by kind."""

        def txn(conn: Connection) -> dict[str, int]:
            counts = dict.fromkeys(RETENTION_KINDS, 0)
            for kind, statement, cutoff in retention_deletes(rules, "?"):
                counts[kind] = conn.execute(statement, (cutoff,)).rowcount
            return counts

        return self._write(txn)

    def claim(self, name: str, holder: str, now: float, until: float) -> Deferred[bool]:
        def txn(conn: Connection) -> bool:
            row = conn.execute(claim_statement("?"), (name, holder, until, holder, now)).fetchone()
            return row is not None

        return self._write(txn)

    def referenced_blobs(self, prefix: bytes) -> Deferred[list[bytes]]:
        def txn(conn: Connection) -> list[bytes]:
            found: list[bytes] = []
            for table, column in BLOB_COLUMNS:
                rows = conn.execute(
                    f"SELECT {column} FROM {table} WHERE substr({column}, 1, ?) = ?",
                    (len(prefix), prefix),
                ).fetchall()
                found.extend(bytes(row[0]) for row in rows)
            return found

        return self._read(txn)

    # -- events ---------------------------------------------------------------------------

    def append_events(
        self, batches: list[tuple[str, list[StoredEvent]]], summaries: dict[str, dict[str, int]]
    ) -> Deferred[None]:
        def txn(conn: Connection) -> None:
            for update_id, events in batches:
                # A key-share lock: the update cannot be deleted before the inserts commit.
                row = conn.execute(
                    f"SELECT 1 FROM updates WHERE id = ?{self._row_lock('FOR KEY SHARE')}",
                    (update_id,),
                ).fetchone()
                if row is None:
                    raise NotFound(f"Not Found: update '{update_id}' not found")
                conn.executemany(
                    "INSERT INTO events (update_id, seq, data) VALUES (?, ?, ?) "
                    "ON CONFLICT (update_id, seq) DO NOTHING",
                    [(update_id, event.sequence, event.data) for event in events],
                )
            # In id order: two nodes summarising the same updates lock them in one order.
            for update_id in sorted(summaries):
                conn.execute(
                    "UPDATE updates SET resource_changes = ? WHERE id = ?",
                    (json.dumps(summaries[update_id]), update_id),
                )

        return self._write(txn)

    def get_events(self, update_id: str, after: int, limit: int) -> Deferred[list[StoredEvent]]:
        def txn(conn: Connection) -> list[StoredEvent]:
            rows = conn.execute(
                "SELECT seq, data FROM events WHERE update_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (update_id, after, limit),
            ).fetchall()
            return [StoredEvent(row[0], bytes(row[1])) for row in rows]

        return self._read(txn)

    # -- identities -----------------------------------------------------------------------

    def put_identity(self, identity: IdentityRecord) -> Deferred[None]:
        def txn(conn: Connection) -> None:
            conn.execute(PUT_IDENTITY, identity_values(identity))

        return self._write(txn)

    def get_identity(self, login: str) -> Deferred[IdentityRecord | None]:
        def txn(conn: Connection) -> IdentityRecord | None:
            row = conn.execute(
                f"SELECT {IDENTITY_COLUMNS} FROM identities WHERE login = ?", (login,)
            ).fetchone()
            return identity_from_row(row) if row else None

        return self._read(txn)

    def list_identities(self) -> Deferred[list[IdentityRecord]]:
        def txn(conn: Connection) -> list[IdentityRecord]:
            rows = conn.execute(
                f"SELECT {IDENTITY_COLUMNS} FROM identities ORDER BY login"
            ).fetchall()
            return [identity_from_row(row) for row in rows]

        return self._read(txn)

    # -- access tokens --------------------------------------------------------------------

    def create_token(self, token: TokenRecord) -> Deferred[None]:
        def txn(conn: Connection) -> None:
            try:
                conn.execute(
                    f"INSERT INTO access_tokens ({TOKEN_COLUMNS}) "
                    f"VALUES ({placeholders(TOKEN_COLUMNS)})",
                    token_values(token),
                )
            except self.unique_violation:
                # Its id or its hash is taken: random ids and tokens never collide by chance.
                raise Conflict("Conflict: the access token already exists") from None

        return self._write(txn)

    def find_token(self, token_hash: str) -> Deferred[TokenRecord | None]:
        def txn(conn: Connection) -> TokenRecord | None:
            row = conn.execute(
                f"SELECT {TOKEN_COLUMNS} FROM access_tokens WHERE token_hash = ?", (token_hash,)
            ).fetchone()
            return token_from_row(row) if row else None

        return self._read(txn)

    def list_tokens(self, login: str | None) -> Deferred[list[TokenRecord]]:
        def txn(conn: Connection) -> list[TokenRecord]:
            where, args = ("WHERE login = ? ", (login,)) if login is not None else ("", ())
            rows = conn.execute(
                f"SELECT {TOKEN_COLUMNS} FROM access_tokens {where}ORDER BY created DESC, id",
                args,
            ).fetchall()
            return [token_from_row(row) for row in rows]

        return self._read(txn)

    def delete_token(self, token_id: str, login: str | None) -> Deferred[bool]:
        def txn(conn: Connection) -> bool:
            if login is None:
                cursor = conn.execute("DELETE FROM access_tokens WHERE id = ?", (token_id,))
            else:
                cursor = conn.execute(
                    "DELETE FROM access_tokens WHERE id = ? AND login = ?", (token_id, login)
                )
            return cursor.rowcount > 0

        return self._write(txn)

    def delete_tokens_of(self, login: str) -> Deferred[int]:
        def txn(conn: Connection) -> int:
            return conn.execute("DELETE FROM access_tokens WHERE login = ?", (login,)).rowcount

        return self._write(txn)

    def touch_tokens(self, last_used: dict[str, float]) -> Deferred[None]:
        if not last_used:
            return succeed(None)

        def txn(conn: Connection) -> None:
            # In id order: two nodes touching the same tokens lock them in one order.
            conn.executemany(
                "UPDATE access_tokens SET last_used = ? WHERE id = ? AND last_used < ?",
                [(last_used[i], i, last_used[i]) for i in sorted(last_used)],
            )

        return self._write(txn)

    # -- audit trail ----------------------------------------------------------------------

    def add_audit_events(self, events: list[AuditRecord]) -> Deferred[None]:
        if not events:
            return succeed(None)

        def txn(conn: Connection) -> None:
            conn.executemany(
                f"INSERT INTO audit_events ({AUDIT_INSERT_COLUMNS}) "
                f"VALUES ({placeholders(AUDIT_INSERT_COLUMNS)})",
                [audit_values(event) for event in events],
            )

        return self._write(txn)

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
        def txn(conn: Connection) -> list[AuditRecord]:
            sql = [f"SELECT {AUDIT_COLUMNS} FROM audit_events WHERE org = ?"]
            args: list[Any] = [org]
            for condition, value in (
                ("id < ?", before_id or None),
                ("time >= ?", start),
                ("time <= ?", end),
                ("actor = ?", actor),
                ("action = ?", action),
            ):
                if value is not None:
                    sql.append("AND " + condition)
                    args.append(value)
            sql.append("ORDER BY id DESC LIMIT ?")
            args.append(limit)
            return [audit_from_row(row) for row in conn.execute(" ".join(sql), args).fetchall()]

        return self._read(txn)

    # -- transaction helpers that need the dialect ------------------------------------------

    def _lock_stack(
        self, conn: Connection, stack_id: int, mode: str = "FOR NO KEY UPDATE"
    ) -> StackRecord:
        """The stack, its row locked in MODE until the transaction ends (NotFound if none)."""
        return self._get_stack_by_id(conn, stack_id, self._row_lock(mode))

    def _get_stack_by_id(self, conn: Connection, stack_id: int, lock: str = "") -> StackRecord:
        row = conn.execute(
            f"SELECT {STACK_COLUMNS} FROM stacks WHERE id = ?{lock}", (stack_id,)
        ).fetchone()
        if row is None:
            raise NotFound("Not Found: stack not found")
        return stack_from_row(row, self._read_tags(conn, [stack_id]).get(stack_id, {}))

    def _get_stack_by_ref(
        self, conn: Connection, ref: StackRef, aliases: bool
    ) -> StackRecord | None:
        row = conn.execute(
            f"SELECT {STACK_COLUMNS} FROM stacks WHERE org = ? AND project = ? AND name = ?",
            (ref.org, ref.project, ref.name),
        ).fetchone()
        if row is None and aliases:
            alias = conn.execute(
                "SELECT stack_id FROM stack_aliases WHERE org = ? AND project = ? AND name = ?",
                (ref.org, ref.project, ref.name),
            ).fetchone()
            if alias:
                return self._get_stack_by_id(conn, alias[0])
        if row is None:
            return None
        return stack_from_row(row, self._read_tags(conn, [row[0]]).get(row[0], {}))

    def _read_tags(self, conn: Connection, stack_ids: list[int]) -> dict[int, dict[str, str]]:
        result: dict[int, dict[str, str]] = {}
        for start in range(0, len(stack_ids), self.in_batch):
            in_ids, args = self._in("stack_id", stack_ids[start : start + self.in_batch])
            rows = conn.execute(
                f"SELECT stack_id, name, value FROM stack_tags WHERE {in_ids}", args
            ).fetchall()
            for stack_id, name, value in rows:
                result.setdefault(stack_id, {})[name] = value
        return result


# -- transaction helpers (runner threads only) ------------------------------------------------


def _write_tags(conn: Connection, stack_id: int, tags: dict[str, str]) -> None:
    conn.execute("DELETE FROM stack_tags WHERE stack_id = ?", (stack_id,))
    conn.executemany(
        "INSERT INTO stack_tags (stack_id, name, value) VALUES (?, ?, ?)",
        [(stack_id, name, value) for name, value in tags.items()],
    )


def _journal_length(conn: Connection, update_id: str) -> int:
    row = conn.execute(
        "SELECT COALESCE(MAX(batch), 0) FROM journal_batches WHERE update_id = ?", (update_id,)
    ).fetchone()
    return int(row[0])


def find_update(conn: Connection, update_id: str) -> UpdateRecord | None:
    row = conn.execute(
        f"SELECT {UPDATE_COLUMNS} FROM updates WHERE id = ?", (update_id,)
    ).fetchone()
    return update_from_row(row) if row else None


def _insert_update(conn: Connection, update: UpdateRecord, *, status: str, version: int) -> None:
    conn.execute(
        f"INSERT INTO updates ({UPDATE_COLUMNS}) VALUES ({', '.join('?' * UPDATE_COLUMN_COUNT)})",
        update_values(update, status=status, version=version),
    )


def _take_over(conn: Connection, stack: StackRecord, now: float) -> None:
    """Refuse while another real update holds a live lease; end one whose lease ran out.

    The engine materialises an expired journaling update before it gets here; this is the
    backstop for a lease that ran out in between. The caller holds the stack's row lock (or
    the database's only write lock), so the holder cannot change under us.
    """
    if not stack.locked_by:
        return
    holder = find_update(conn, stack.locked_by)
    if holder and holder.status == "running" and (holder.lease_expires or 0) > now:
        raise Conflict(ANOTHER_UPDATE)
    if holder is not None and holder.status == "running":
        _finish(conn, holder, "failed", now, None, 0)
    conn.execute("UPDATE stacks SET locked_by = NULL WHERE id = ?", (stack.id,))


def _finish(
    conn: Connection,
    update: UpdateRecord,
    status: str,
    now: float,
    state: StateBlob | None,
    keep_versions: int,
    failure: str | None = None,
) -> None:
    conn.execute(
        "UPDATE updates SET status = ?, end_time = ?, failure = ? WHERE id = ?",
        (status, now, failure, update.id),
    )
    conn.execute(
        "UPDATE stacks SET locked_by = NULL WHERE id = ? AND locked_by = ?",
        (update.stack_id, update.id),
    )
    if update.dry_run:
        return
    conn.execute(
        "UPDATE stacks SET last_update_time = ? WHERE id = ? AND last_update = ?",
        (int(now), update.stack_id, update.id),
    )
    if state is not None:
        # The materialised result of journal entries or deltas becomes version N.
        _put_state(conn, update.stack_id, update.version, state)
        conn.execute(
            "UPDATE stacks SET resource_count = ? WHERE id = ? AND version = ?",
            (state.resource_count, update.stack_id, update.version),
        )
    conn.execute("DELETE FROM journal_batches WHERE update_id = ?", (update.id,))
    conn.execute("DELETE FROM checkpoint_deltas WHERE update_id = ?", (update.id,))
    _prune(conn, update.stack_id, update.version, keep_versions)


def _put_state(conn: Connection, stack_id: int, version: int, state: StateBlob) -> None:
    conn.execute(
        "INSERT INTO states (stack_id, version, data, resource_count) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (stack_id, version) DO UPDATE "
        "SET data = excluded.data, resource_count = excluded.resource_count",
        (stack_id, version, state.gzipped, state.resource_count),
    )


def _prune(conn: Connection, stack_id: int, version: int, keep: int) -> None:
    if keep > 0:
        conn.execute(
            "DELETE FROM states WHERE stack_id = ? AND version <= ?", (stack_id, version - keep)
        )


def _operation(f: Callable[..., Any]) -> str:
    """The store method a call belongs to: `create_stack` for create_stack's inner txn."""
    qualified = getattr(f, "__qualname__", "") or getattr(f, "__name__", "call")
    outer = qualified.split(".<locals>.", 1)[0]
    return outer.rsplit(".", 1)[-1].lstrip("_")
