"""The PostgreSQL store: the same Store as SQLiteStore (its semantics are the spec), shared by
several pulumid nodes. Metadata and blobs (states, journal batches, deltas, events) are in
the database, as BYTEA, for now.

Every public method hands a `_txn` function to the runner, as in sqlite.py. Each runner thread
has its own connection (opened lazily from the DSN, reopened after it broke). Reads run in
autocommit; each write is one transaction.

SQLite serialises every write (BEGIN IMMEDIATE); here several nodes write at once, so each
write that reads-then-decides locks what it decides on first: the stack row
(`FOR NO KEY UPDATE`), then the update row. Every transaction that changes an update's status,
lease or checkpoints, or a stack's version or lock, holds its stack's row lock, always taken
before any update row lock (one order, no deadlocks). `FOR NO KEY UPDATE` does not block the
key-share locks that foreign keys take, so inserting events or states never waits on it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pulumid.auth.tokens import same
from pulumid.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PulumidError,
    Stale,
    Unavailable,
)
from pulumid.storage.faults import Faults
from pulumid.storage.pg_schema import MIGRATION_LOCK, MIGRATIONS, SCHEMA_VERSION
from pulumid.storage.records import (
    RetentionRules,
    StackRecord,
    StackRef,
    StateBlob,
    StoredEvent,
    UpdateRecord,
)
from pulumid.storage.rows import (
    ANOTHER_UPDATE,
    BLOB_COLUMNS,
    STACK_COLUMNS,
    STACK_HAS_RESOURCES,
    STORAGE_FAILED,
    UPDATE_COLUMN_COUNT,
    UPDATE_COLUMNS,
    check_checkpointing,
    check_lease,
    check_writable,
    claim_statement,
    not_running_message,
    retention_deletes,
    stack_from_row,
    update_from_row,
    update_values,
)
from pulumid.storage.sqlite import SchemaTooNew
from pulumid.threads import Runner

__all__ = ["PostgresStore", "SchemaTooNew", "migrate"]

T = TypeVar("T")
Conn = psycopg.Connection[tuple[Any, ...]]
log = Logger()

# A write waits this long for a row lock held by another node before it gives up (503), as
# SQLite's busy_timeout does.
LOCK_TIMEOUT = "10s"

_UPSERT_STATE = (
    "INSERT INTO states (stack_id, version, data, resource_count) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (stack_id, version) DO UPDATE "
    "SET data = excluded.data, resource_count = excluded.resource_count"
)


def connect(dsn: str) -> Conn:
    conn = psycopg.connect(dsn, autocommit=True, application_name="pulumid")
    try:
        conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: Conn) -> int:
    """Bring the schema up to date, in one transaction under an advisory lock: one node
    migrates, the others wait and then find the schema current."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL)")
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        current = int(bytes(row[0])) if row else 0
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the database schema is version {current}, newer than this pulumid "
                f"understands ({SCHEMA_VERSION}); upgrade pulumid"
            )
        for version in range(current, SCHEMA_VERSION):
            step = MIGRATIONS[version]
            if callable(step):
                step(conn)
            else:
                conn.execute(step)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(version + 1).encode(),),
            )
    return SCHEMA_VERSION


class PostgresStore:
    def __init__(self, dsn: str, runner: Runner, *, faults: Faults | None = None) -> None:
        self._dsn = dsn
        self._runner = runner
        self.faults = faults or Faults()
        self._local = threading.local()
        self._guard = threading.Lock()
        self._connections: list[Conn] = []

    @classmethod
    def open(cls, dsn: str, runner: Runner, *, faults: Faults | None = None) -> PostgresStore:
        """Migrate the schema (on a connection of its own) and return the store."""
        with connect(dsn) as conn:
            migrate(conn)
        return cls(dsn, runner, faults=faults)

    def close(self) -> None:
        with self._guard:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    # -- plumbing -------------------------------------------------------------------------

    def _connection(self) -> Conn:
        """This thread's connection; a new one if there is none yet or it broke."""
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            self._discard(conn)
        conn = connect(self._dsn)
        self._local.conn = conn
        with self._guard:
            self._connections.append(conn)
        return conn

    def _discard(self, conn: Conn) -> None:
        self._local.conn = None
        with self._guard:
            if conn in self._connections:
                self._connections.remove(conn)
        try:
            conn.close()
        except psycopg.Error:
            pass

    def _failed(self, error: Exception) -> PulumidError:
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or conn.broken):
            self._discard(conn)  # the next call on this thread reconnects
        return _unavailable(error)

    def _read(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._runner.run(self._reading, f, *args)

    def _write(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._runner.run(self._in_transaction, f, *args)

    def _reading(self, f: Callable[..., T], *args: Any) -> T:
        try:
            return f(self._connection(), *args)
        except psycopg.Error as e:
            raise self._failed(e) from e

    def _in_transaction(self, f: Callable[..., T], *args: Any) -> T:
        try:
            conn = self._connection()
            with conn.transaction():
                try:
                    result = f(conn, *args)
                    self.faults.hit("commit")
                except BaseException:
                    self._rollback_fault()
                    raise
        except (psycopg.Error, sqlite3.Error) as e:  # sqlite3: an injected fault
            raise self._failed(e) from e
        self.faults.hit("committed")
        return result

    def _rollback_fault(self) -> None:
        """The `rollback` fault point: a failing ROLLBACK is logged, the error stays."""
        try:
            self.faults.hit("rollback")
        except sqlite3.Error as e:
            log.error("ROLLBACK failed after an error: {error}", error=str(e))

    # -- meta -----------------------------------------------------------------------------

    def get_meta(self, key: str) -> Deferred[bytes | None]:
        def txn(conn: Conn) -> bytes | None:
            row = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
            return bytes(row[0]) if row else None

        return self._read(txn)

    def set_meta_if_absent(self, key: str, value: bytes) -> Deferred[bytes]:
        def txn(conn: Conn) -> bytes:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                (key, value),
            )
            row = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
            assert row is not None
            return bytes(row[0])

        return self._write(txn)

    # -- stacks ---------------------------------------------------------------------------

    def create_stack(
        self, ref: StackRef, tags: dict[str, str], now: float, initial: StateBlob | None
    ) -> Deferred[StackRecord]:
        return self._write(self._create_stack_txn, ref, tags, now, initial)

    @staticmethod
    def _create_stack_txn(
        conn: Conn,
        ref: StackRef,
        tags: dict[str, str],
        now: float,
        initial: StateBlob | None,
    ) -> StackRecord:
        # ON CONFLICT waits for a concurrent insert of the same name, then skips the row.
        row = conn.execute(
            "INSERT INTO stacks (org, project, name, created, resource_count) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (org, project, name) DO NOTHING "
            "RETURNING id",
            (
                ref.org,
                ref.project,
                ref.name,
                int(now),
                initial.resource_count if initial else None,
            ),
        ).fetchone()
        if row is None:
            raise Conflict(f"Conflict: stack '{ref}' already exists")
        stack_id: int = row[0]
        _write_tags(conn, stack_id, tags)
        conn.execute(
            "DELETE FROM stack_aliases WHERE org = %s AND project = %s AND name = %s",
            (ref.org, ref.project, ref.name),
        )
        if initial is not None:
            conn.execute(
                "INSERT INTO states (stack_id, version, data, resource_count) "
                "VALUES (%s, 0, %s, %s)",
                (stack_id, initial.gzipped, initial.resource_count),
            )
        return _get_stack_by_id(conn, stack_id)

    def get_stack(self, ref: StackRef) -> Deferred[StackRecord | None]:
        return self._read(_get_stack_by_ref, ref, False)

    def get_stack_or_alias(self, ref: StackRef) -> Deferred[StackRecord | None]:
        return self._read(_get_stack_by_ref, ref, True)

    def list_stacks(
        self,
        orgs: list[str],
        project: str | None,
        tag_name: str | None,
        tag_value: str | None,
        after_id: int,
        limit: int,
    ) -> Deferred[list[StackRecord]]:
        def txn(conn: Conn) -> list[StackRecord]:
            sql = [f"SELECT {STACK_COLUMNS} FROM stacks s WHERE id > %s AND org = ANY(%s)"]
            args: list[Any] = [after_id, list(orgs)]
            if project is not None:
                sql.append("AND project = %s")
                args.append(project)
            if tag_name is not None:
                sql.append(
                    "AND EXISTS (SELECT 1 FROM stack_tags t WHERE t.stack_id = s.id "
                    "AND t.name = %s" + (" AND t.value = %s)" if tag_value is not None else ")")
                )
                args.append(tag_name)
                if tag_value is not None:
                    args.append(tag_value)
            sql.append("ORDER BY id LIMIT %s")
            args.append(limit)
            rows = conn.execute(" ".join(sql), args).fetchall()
            tags = _read_tags(conn, [row[0] for row in rows])
            return [stack_from_row(row, tags.get(row[0], {})) for row in rows]

        return self._read(txn)

    def project_exists(self, org: str, project: str) -> Deferred[bool]:
        def txn(conn: Conn) -> bool:
            row = conn.execute(
                "SELECT 1 FROM stacks WHERE org = %s AND project = %s LIMIT 1", (org, project)
            ).fetchone()
            return row is not None

        return self._read(txn)

    def delete_stack(self, stack_id: int, force: bool) -> Deferred[None]:
        def txn(conn: Conn) -> None:
            stack = _lock_stack(conn, stack_id, "FOR UPDATE")
            if not force and (stack.resource_count or 0) > 0:
                raise BadRequest(STACK_HAS_RESOURCES)
            if stack.locked_by and not force:
                raise Conflict(ANOTHER_UPDATE)
            conn.execute("DELETE FROM stacks WHERE id = %s", (stack_id,))

        return self._write(txn)

    def set_tags(self, stack_id: int, tags: dict[str, str]) -> Deferred[None]:
        def txn(conn: Conn) -> None:
            _lock_stack(conn, stack_id)
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
        def txn(conn: Conn) -> None:
            stack = _lock_stack(conn, stack_id)
            if stack.locked_by:
                raise Conflict(ANOTHER_UPDATE)
            if stack.version != expected_version:
                raise Conflict("Conflict: the stack changed during the rename; try again")
            taken = conn.execute(
                "SELECT 1 FROM stacks WHERE org = %s AND project = %s AND name = %s",
                (new_ref.org, new_ref.project, new_ref.name),
            ).fetchone()
            if taken:
                raise Conflict(f"Conflict: stack '{new_ref}' already exists")
            conn.execute(
                "DELETE FROM stack_aliases WHERE org = %s AND project = %s AND name = %s",
                (new_ref.org, new_ref.project, new_ref.name),
            )
            conn.execute(
                "INSERT INTO stack_aliases (org, project, name, stack_id) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (org, project, name) "
                "DO UPDATE SET stack_id = excluded.stack_id",
                (stack.org, stack.project, stack.name, stack_id),
            )
            try:
                # Another node may have created or renamed a stack to the name meanwhile.
                conn.execute(
                    "UPDATE stacks SET project = %s, name = %s WHERE id = %s",
                    (new_ref.project, new_ref.name, stack_id),
                )
            except psycopg.errors.UniqueViolation:
                raise Conflict(f"Conflict: stack '{new_ref}' already exists") from None
            if state is not None and update is not None:
                version = stack.version + 1
                _insert_update(conn, update, status="succeeded", version=version)
                _put_state(conn, stack_id, version, state)
                conn.execute(
                    "UPDATE stacks SET version = %s, last_update = %s, last_update_time = %s "
                    "WHERE id = %s",
                    (version, update.id, int(update.end_time or update.created), stack_id),
                )
                _prune(conn, stack_id, version, keep_versions)

        return self._write(txn)

    def get_state(self, stack_id: int, version: int | None) -> Deferred[StateBlob | None]:
        def txn(conn: Conn) -> StateBlob | None:
            if version is None:
                row = conn.execute(
                    "SELECT st.data, st.resource_count FROM states st JOIN stacks s "
                    "ON s.id = st.stack_id AND s.version = st.version WHERE s.id = %s",
                    (stack_id,),
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT data, resource_count FROM states WHERE stack_id = %s AND version = %s",
                    (stack_id, version),
                ).fetchone()
            return StateBlob(bytes(row[0]), row[1]) if row else None

        return self._read(txn)

    # -- secrets keys ---------------------------------------------------------------------

    def get_stack_key(self, stack_id: int) -> Deferred[bytes | None]:
        def txn(conn: Conn) -> bytes | None:
            row = conn.execute(
                "SELECT wrapped FROM stack_keys WHERE stack_id = %s", (stack_id,)
            ).fetchone()
            return bytes(row[0]) if row else None

        return self._read(txn)

    def put_stack_key_if_absent(self, stack_id: int, wrapped: bytes) -> Deferred[bytes]:
        def txn(conn: Conn) -> bytes:
            conn.execute(
                "INSERT INTO stack_keys (stack_id, wrapped) VALUES (%s, %s) "
                "ON CONFLICT (stack_id) DO NOTHING",
                (stack_id, wrapped),
            )
            row = conn.execute(
                "SELECT wrapped FROM stack_keys WHERE stack_id = %s", (stack_id,)
            ).fetchone()
            assert row is not None
            return bytes(row[0])

        return self._write(txn)

    # -- updates --------------------------------------------------------------------------

    def create_update(self, update: UpdateRecord) -> Deferred[None]:
        def txn(conn: Conn) -> None:
            # A key-share lock: the stack cannot be deleted before the insert commits.
            _lock_stack(conn, update.stack_id, "FOR KEY SHARE")
            _insert_update(conn, update, status=update.status, version=update.version)

        return self._write(txn)

    def get_update(self, update_id: str) -> Deferred[UpdateRecord | None]:
        def txn(conn: Conn) -> UpdateRecord | None:
            return _find_update(conn, update_id)

        return self._read(txn)

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
        def txn(conn: Conn) -> UpdateRecord:
            update = _lock_update(conn, update_id)
            if update is None:
                raise NotFound("Not Found: update not found")
            if update.status != "not-started":
                raise Conflict("Conflict: The Update has already been started.")
            stack = _get_stack_by_id(conn, update.stack_id)  # locked by _lock_update
            version = stack.version
            if not update.dry_run:
                _take_over(conn, stack, now)
                version = stack.version + 1
                # Version N starts as a copy of N-1: export works before any checkpoint, and
                # it is the base that journal entries are replayed onto.
                conn.execute(
                    "INSERT INTO states (stack_id, version, data, resource_count) "
                    "SELECT stack_id, %s, data, resource_count FROM states "
                    "WHERE stack_id = %s AND version = %s "
                    "ON CONFLICT (stack_id, version) DO UPDATE "
                    "SET data = excluded.data, resource_count = excluded.resource_count",
                    (version, stack.id, stack.version),
                )
                conn.execute(
                    "UPDATE stacks SET version = %s, locked_by = %s, last_update = %s "
                    "WHERE id = %s",
                    (version, update_id, update_id, stack.id),
                )
            if tags is not None:
                _write_tags(conn, stack.id, tags)
            conn.execute(
                "UPDATE updates SET status = 'running', token_hash = %s, lease_expires = %s, "
                "start_time = %s, version = %s, journal_version = %s, engine_version = %s "
                "WHERE id = %s",
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
            started = _find_update(conn, update_id)
            assert started is not None
            return started

        return self._write(txn)

    def check_lease(
        self, update_id: str, token_hash: str, now: float, ref: StackRef | None = None
    ) -> Deferred[UpdateRecord]:
        def txn(conn: Conn) -> UpdateRecord:
            if ref is not None:
                row = conn.execute(
                    "SELECT 1 FROM updates u JOIN stacks s ON s.id = u.stack_id "
                    "WHERE u.id = %s AND s.org = %s AND s.project = %s AND s.name = %s",
                    (update_id, ref.org, ref.project, ref.name),
                ).fetchone()
                if row is None:
                    raise NotFound(f"Not Found: update '{update_id}' not found")
            return check_lease(_find_update(conn, update_id), token_hash, now)

        return self._read(txn)

    def renew_lease(
        self, update_id: str, token_hash: str, now: float, lease_expires: float
    ) -> Deferred[None]:
        def txn(conn: Conn) -> None:
            check_lease(_lock_update(conn, update_id), token_hash, now)
            conn.execute(
                "UPDATE updates SET lease_expires = %s WHERE id = %s", (lease_expires, update_id)
            )

        return self._write(txn)

    def save_checkpoint(
        self, update_id: str, token_hash: str, now: float, state: StateBlob, sequence: int = 0
    ) -> Deferred[bool]:
        def txn(conn: Conn) -> bool:
            update = check_checkpointing(_lock_update(conn, update_id), token_hash, now)
            if sequence and sequence <= update.checkpoint_seq:
                return False  # a late retry must not roll the state back
            _put_state(conn, update.stack_id, update.version, state)
            conn.execute(
                "UPDATE stacks SET resource_count = %s WHERE id = %s AND version = %s",
                (state.resource_count, update.stack_id, update.version),
            )
            # A full state supersedes the deltas saved before it.
            conn.execute("DELETE FROM checkpoint_deltas WHERE update_id = %s", (update_id,))
            conn.execute(
                "UPDATE updates SET checkpoint_seq = GREATEST(checkpoint_seq, %s) WHERE id = %s",
                (sequence, update_id),
            )
            return True

        return self._write(txn)

    def save_delta(
        self, update_id: str, token_hash: str, now: float, sequence: int, body: bytes
    ) -> Deferred[bool]:
        def txn(conn: Conn) -> bool:
            update = check_checkpointing(_lock_update(conn, update_id), token_hash, now)
            if sequence <= update.checkpoint_seq:
                return False
            conn.execute(
                "INSERT INTO checkpoint_deltas (update_id, seq, body) VALUES (%s, %s, %s) "
                "ON CONFLICT (update_id, seq) DO UPDATE SET body = excluded.body",
                (update_id, sequence, body),
            )
            conn.execute(
                "UPDATE updates SET checkpoint_seq = %s WHERE id = %s", (sequence, update_id)
            )
            return True

        return self._write(txn)

    def has_deltas(self, update_id: str) -> Deferred[bool]:
        def txn(conn: Conn) -> bool:
            row = conn.execute(
                "SELECT 1 FROM checkpoint_deltas WHERE update_id = %s LIMIT 1", (update_id,)
            ).fetchone()
            return row is not None

        return self._read(txn)

    def get_deltas(self, update_id: str) -> Deferred[list[tuple[int, bytes]]]:
        def txn(conn: Conn) -> list[tuple[int, bytes]]:
            rows = conn.execute(
                "SELECT seq, body FROM checkpoint_deltas WHERE update_id = %s ORDER BY seq",
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
        def txn(conn: Conn) -> int:
            # The lock makes the length read below and the insert one step across nodes.
            update = check_writable(_lock_update(conn, update_id), token_hash, now)
            if not update.journal_version:
                raise BadRequest("Bad Request: journaling was not enabled for this update")
            length = _journal_length(conn, update_id)
            if after is not None and after != length:
                raise Stale("Conflict: the update's journal moved on; retry the request")
            conn.execute(
                "INSERT INTO journal_batches (update_id, batch, body) VALUES (%s, %s, %s)",
                (update_id, length + 1, body),
            )
            return length + 1

        return self._write(txn)

    def journal_length(self, update_id: str) -> Deferred[int]:
        return self._read(_journal_length, update_id)

    def get_journal(self, update_id: str) -> Deferred[list[bytes]]:
        def txn(conn: Conn) -> list[bytes]:
            rows = conn.execute(
                "SELECT body FROM journal_batches WHERE update_id = %s ORDER BY batch",
                (update_id,),
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

        def txn(conn: Conn) -> None:
            update = _lock_update(conn, update_id)
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
        def txn(conn: Conn) -> None:
            update = _lock_update(conn, update_id)
            if update is None:
                raise NotFound("Not Found: update not found")
            if update.status != "running":
                raise Conflict(not_running_message(update.status))
            _finish(conn, update, "cancelled", now, state, keep_versions, failure)

        return self._write(txn)

    def list_expired(self, now: float) -> Deferred[list[UpdateRecord]]:
        def txn(conn: Conn) -> list[UpdateRecord]:
            rows = conn.execute(
                f"SELECT {UPDATE_COLUMNS} FROM updates "
                "WHERE status = 'running' AND lease_expires <= %s",
                (now,),
            ).fetchall()
            return [update_from_row(row) for row in rows]

        return self._read(txn)

    def expire_update(
        self,
        update_id: str,
        now: float,
        state: StateBlob | None = None,
        keep_versions: int = 0,
        failure: str | None = None,
    ) -> Deferred[bool]:
        def txn(conn: Conn) -> bool:
            update = _lock_update(conn, update_id)
            if update is None or update.status != "running" or (update.lease_expires or 0) > now:
                return False  # renewed, finished or taken over meanwhile
            _finish(conn, update, "failed", now, state, keep_versions, failure)
            return True

        return self._write(txn)

    def import_state(
        self, update: UpdateRecord, state: StateBlob, keep_versions: int
    ) -> Deferred[int]:
        def txn(conn: Conn) -> int:
            stack = _lock_stack(conn, update.stack_id)
            now = update.created
            _take_over(conn, stack, now)
            version = stack.version + 1
            _insert_update(conn, update, status="succeeded", version=version)
            _put_state(conn, stack.id, version, state)
            conn.execute(
                "UPDATE stacks SET version = %s, last_update = %s, last_update_time = %s, "
                "resource_count = %s WHERE id = %s",
                (version, update.id, int(now), state.resource_count, stack.id),
            )
            _prune(conn, stack.id, version, keep_versions)
            return version

        return self._write(txn)

    def list_history(
        self, stack_id: int, page: int, page_size: int, previews: bool = True
    ) -> Deferred[list[UpdateRecord]]:
        """Newest first; page 0 is every entry. Previews are listed unless `previews` is off."""

        def txn(conn: Conn) -> list[UpdateRecord]:
            sql = (
                f"SELECT {UPDATE_COLUMNS} FROM updates WHERE stack_id = %s "
                "AND status != 'not-started'"
                + ("" if previews else " AND NOT dry_run")
                + " ORDER BY version DESC, created DESC"
            )
            args: tuple[Any, ...] = (stack_id,)
            if page > 0:
                sql += " LIMIT %s OFFSET %s"
                args = (stack_id, page_size, (page - 1) * page_size)
            return [update_from_row(row) for row in conn.execute(sql, args).fetchall()]

        return self._read(txn)

    def get_update_by_version(self, stack_id: int, version: int) -> Deferred[UpdateRecord | None]:
        def txn(conn: Conn) -> UpdateRecord | None:
            row = conn.execute(
                f"SELECT {UPDATE_COLUMNS} FROM updates WHERE stack_id = %s AND version = %s "
                "AND NOT dry_run AND status != 'not-started' ORDER BY created DESC LIMIT 1",
                (stack_id, version),
            ).fetchone()
            return update_from_row(row) if row else None

        return self._read(txn)

    def find_update_by_token(self, token_hash: str) -> Deferred[UpdateRecord | None]:
        """The update (running or ended) whose token hashes to `token_hash`, if any."""

        def txn(conn: Conn) -> UpdateRecord | None:
            row = conn.execute(
                f"SELECT {UPDATE_COLUMNS} FROM updates WHERE token_hash = %s",
                (token_hash,),
            ).fetchone()
            return update_from_row(row) if row else None

        return self._read(txn)

    def prune(self, rules: RetentionRules) -> Deferred[dict[str, int]]:
        """Delete what retention lets go of; one transaction, counts by kind."""

        def txn(conn: Conn) -> dict[str, int]:
            counts = dict.fromkeys(("events", "previews", "updates", "unstarted", "claims"), 0)
            for kind, statement, cutoff in retention_deletes(rules, "%s"):
                counts[kind] = conn.execute(statement, (cutoff,)).rowcount
            return counts

        return self._write(txn)

    def claim(self, name: str, holder: str, now: float, until: float) -> Deferred[bool]:
        def txn(conn: Conn) -> bool:
            row = conn.execute(claim_statement("%s"), (name, holder, until, holder, now)).fetchone()
            return row is not None

        return self._write(txn)

    def referenced_blobs(self, prefix: bytes) -> Deferred[list[bytes]]:
        def txn(conn: Conn) -> list[bytes]:
            found: list[bytes] = []
            for table, column in BLOB_COLUMNS:
                rows = conn.execute(
                    f"SELECT {column} FROM {table} WHERE substr({column}, 1, %s) = %s",
                    (len(prefix), prefix),
                ).fetchall()
                found.extend(bytes(row[0]) for row in rows)
            return found

        return self._read(txn)

    # -- events ---------------------------------------------------------------------------

    def append_events(
        self, batches: list[tuple[str, list[StoredEvent]]], summaries: dict[str, dict[str, int]]
    ) -> Deferred[None]:
        def txn(conn: Conn) -> None:
            for update_id, events in batches:
                # A key-share lock: the update cannot be deleted before the inserts commit.
                row = conn.execute(
                    "SELECT 1 FROM updates WHERE id = %s FOR KEY SHARE", (update_id,)
                ).fetchone()
                if row is None:
                    raise NotFound(f"Not Found: update '{update_id}' not found")
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO events (update_id, seq, data) VALUES (%s, %s, %s) "
                        "ON CONFLICT (update_id, seq) DO NOTHING",
                        [(update_id, event.sequence, event.data) for event in events],
                    )
            # In id order: two nodes summarising the same updates lock them in one order.
            for update_id in sorted(summaries):
                conn.execute(
                    "UPDATE updates SET resource_changes = %s WHERE id = %s",
                    (json.dumps(summaries[update_id]), update_id),
                )

        return self._write(txn)

    def get_events(self, update_id: str, after: int, limit: int) -> Deferred[list[StoredEvent]]:
        def txn(conn: Conn) -> list[StoredEvent]:
            rows = conn.execute(
                "SELECT seq, data FROM events WHERE update_id = %s AND seq > %s "
                "ORDER BY seq LIMIT %s",
                (update_id, after, limit),
            ).fetchall()
            return [StoredEvent(row[0], bytes(row[1])) for row in rows]

        return self._read(txn)


# -- transaction helpers (runner threads only) ------------------------------------------------


def _unavailable(error: Exception) -> PulumidError:
    """Storage failures answer 503 with a fixed message; the detail goes to the log only."""
    log.error(
        "database error: {kind}: {error}", kind=type(error).__name__, error=str(error).strip()
    )
    return Unavailable(STORAGE_FAILED)


def _lock_stack(conn: Conn, stack_id: int, mode: str = "FOR NO KEY UPDATE") -> StackRecord:
    """The stack, its row locked until the transaction ends (NotFound if there is none)."""
    row = conn.execute(
        f"SELECT {STACK_COLUMNS} FROM stacks WHERE id = %s {mode}", (stack_id,)
    ).fetchone()
    if row is None:
        raise NotFound("Not Found: stack not found")
    return stack_from_row(row, _read_tags(conn, [stack_id]).get(stack_id, {}))


def _lock_update(conn: Conn, update_id: str) -> UpdateRecord | None:
    """The update as it is once its stack's row and its own row are locked (in that order),
    or None. An update never moves to another stack, so the first read finds the right one."""
    row = conn.execute("SELECT stack_id FROM updates WHERE id = %s", (update_id,)).fetchone()
    if row is None:
        return None
    conn.execute("SELECT 1 FROM stacks WHERE id = %s FOR NO KEY UPDATE", (row[0],))
    locked = conn.execute(
        f"SELECT {UPDATE_COLUMNS} FROM updates WHERE id = %s FOR NO KEY UPDATE", (update_id,)
    ).fetchone()
    return update_from_row(locked) if locked else None


def _get_stack_by_id(conn: Conn, stack_id: int) -> StackRecord:
    row = conn.execute(f"SELECT {STACK_COLUMNS} FROM stacks WHERE id = %s", (stack_id,)).fetchone()
    if row is None:
        raise NotFound("Not Found: stack not found")
    return stack_from_row(row, _read_tags(conn, [stack_id]).get(stack_id, {}))


def _get_stack_by_ref(conn: Conn, ref: StackRef, aliases: bool) -> StackRecord | None:
    row = conn.execute(
        f"SELECT {STACK_COLUMNS} FROM stacks WHERE org = %s AND project = %s AND name = %s",
        (ref.org, ref.project, ref.name),
    ).fetchone()
    if row is None and aliases:
        alias = conn.execute(
            "SELECT stack_id FROM stack_aliases WHERE org = %s AND project = %s AND name = %s",
            (ref.org, ref.project, ref.name),
        ).fetchone()
        if alias:
            return _get_stack_by_id(conn, alias[0])
    if row is None:
        return None
    return stack_from_row(row, _read_tags(conn, [row[0]]).get(row[0], {}))


def _read_tags(conn: Conn, stack_ids: list[int]) -> dict[int, dict[str, str]]:
    result: dict[int, dict[str, str]] = {}
    if not stack_ids:
        return result
    rows = conn.execute(
        "SELECT stack_id, name, value FROM stack_tags WHERE stack_id = ANY(%s)",
        (stack_ids,),
    ).fetchall()
    for stack_id, name, value in rows:
        result.setdefault(stack_id, {})[name] = value
    return result


def _write_tags(conn: Conn, stack_id: int, tags: dict[str, str]) -> None:
    conn.execute("DELETE FROM stack_tags WHERE stack_id = %s", (stack_id,))
    if tags:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO stack_tags (stack_id, name, value) VALUES (%s, %s, %s)",
                [(stack_id, name, value) for name, value in tags.items()],
            )


def _journal_length(conn: Conn, update_id: str) -> int:
    row = conn.execute(
        "SELECT COALESCE(MAX(batch), 0) FROM journal_batches WHERE update_id = %s", (update_id,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def _find_update(conn: Conn, update_id: str) -> UpdateRecord | None:
    row = conn.execute(
        f"SELECT {UPDATE_COLUMNS} FROM updates WHERE id = %s", (update_id,)
    ).fetchone()
    return update_from_row(row) if row else None


def _insert_update(conn: Conn, update: UpdateRecord, *, status: str, version: int) -> None:
    conn.execute(
        f"INSERT INTO updates ({UPDATE_COLUMNS}) "
        f"VALUES ({', '.join(['%s'] * UPDATE_COLUMN_COUNT)})",
        update_values(update, status=status, version=version),
    )


def _take_over(conn: Conn, stack: StackRecord, now: float) -> None:
    """Refuse while another real update holds a live lease; end one whose lease ran out.

    The caller holds the stack's row lock, so the holder cannot change under us.
    """
    if not stack.locked_by:
        return
    holder = _find_update(conn, stack.locked_by)
    if holder and holder.status == "running" and (holder.lease_expires or 0) > now:
        raise Conflict(ANOTHER_UPDATE)
    if holder is not None and holder.status == "running":
        _finish(conn, holder, "failed", now, None, 0)
    conn.execute("UPDATE stacks SET locked_by = NULL WHERE id = %s", (stack.id,))


def _finish(
    conn: Conn,
    update: UpdateRecord,
    status: str,
    now: float,
    state: StateBlob | None,
    keep_versions: int,
    failure: str | None = None,
) -> None:
    conn.execute(
        "UPDATE updates SET status = %s, end_time = %s, failure = %s WHERE id = %s",
        (status, now, failure, update.id),
    )
    conn.execute(
        "UPDATE stacks SET locked_by = NULL WHERE id = %s AND locked_by = %s",
        (update.stack_id, update.id),
    )
    if update.dry_run:
        return
    conn.execute(
        "UPDATE stacks SET last_update_time = %s WHERE id = %s AND last_update = %s",
        (int(now), update.stack_id, update.id),
    )
    if state is not None:
        # The materialised result of journal entries or deltas becomes version N.
        _put_state(conn, update.stack_id, update.version, state)
        conn.execute(
            "UPDATE stacks SET resource_count = %s WHERE id = %s AND version = %s",
            (state.resource_count, update.stack_id, update.version),
        )
    conn.execute("DELETE FROM journal_batches WHERE update_id = %s", (update.id,))
    conn.execute("DELETE FROM checkpoint_deltas WHERE update_id = %s", (update.id,))
    _prune(conn, update.stack_id, update.version, keep_versions)


def _put_state(conn: Conn, stack_id: int, version: int, state: StateBlob) -> None:
    conn.execute(_UPSERT_STATE, (stack_id, version, state.gzipped, state.resource_count))


def _prune(conn: Conn, stack_id: int, version: int, keep: int) -> None:
    if keep > 0:
        conn.execute(
            "DELETE FROM states WHERE stack_id = %s AND version <= %s", (stack_id, version - keep)
        )
