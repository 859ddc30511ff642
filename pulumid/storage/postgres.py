"""The PostgreSQL store: the same Store as SQLiteStore (its semantics are the spec), shared by
several pulumid nodes. Metadata and blobs (states, journal batches, deltas, events) are in
the database, as BYTEA, for now.

The Store operations are SQLStore's (sql.py); here are connecting, migrating, transactions
and the row locks. Each runner thread has its own connection (opened lazily from the DSN,
reopened after it broke). Reads run in autocommit; each write is one transaction.

SQLite serialises every write (BEGIN IMMEDIATE); here several nodes write at once, so each
write that reads-then-decides locks what it decides on first: the stack row
(`FOR NO KEY UPDATE`), then the update row. Every transaction that changes an update's status,
lease or checkpoints, or a stack's version or lock, holds its stack's row lock, always taken
before any update row lock (one order, no deadlocks). `FOR NO KEY UPDATE` does not block the
key-share locks that foreign keys take, so inserting events or states never waits on it.
"""

from __future__ import annotations

import functools
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from twisted.logger import Logger

from pulumid.errors import PulumidError, Unavailable
from pulumid.storage.faults import Faults
from pulumid.storage.pg_schema import MIGRATION_LOCK, MIGRATIONS, SCHEMA_VERSION
from pulumid.storage.records import UpdateRecord
from pulumid.storage.rows import STORAGE_FAILED, UPDATE_COLUMNS, update_from_row
from pulumid.storage.sql import INSERT_STACK, Connection, SchemaTooNew, SQLStore
from pulumid.threads import Runner

__all__ = ["PostgresStore", "SchemaTooNew", "migrate"]

T = TypeVar("T")
Conn = psycopg.Connection[tuple[Any, ...]]
log = Logger()

# A write waits this long for a row lock held by another node before it gives up (503), as
# SQLite's busy_timeout does.
LOCK_TIMEOUT = "10s"


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


class PostgresStore(SQLStore):
    expected_schema = SCHEMA_VERSION
    unique_violation = psycopg.errors.UniqueViolation
    in_batch = sys.maxsize  # one array parameter holds them all

    def __init__(self, dsn: str, runner: Runner, *, faults: Faults | None = None) -> None:
        super().__init__(runner, faults)
        self._dsn = dsn
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

    def _reading(self, f: Callable[..., T], *args: Any) -> T:
        try:
            return f(_Qmark(self._connection()), *args)
        except psycopg.Error as e:
            raise self._failed(e) from e

    def _in_transaction(self, f: Callable[..., T], *args: Any) -> T:
        try:
            conn = self._connection()
            with conn.transaction():
                try:
                    result = f(_Qmark(conn), *args)
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

    # -- the dialect ----------------------------------------------------------------------

    def _row_lock(self, mode: str) -> str:
        return f" {mode}"

    def _lock_update(self, conn: Connection, update_id: str) -> UpdateRecord | None:
        """The update as it is once its stack's row and its own row are locked (in that order),
        or None. An update never moves to another stack, so the first read finds the right one."""
        row = conn.execute("SELECT stack_id FROM updates WHERE id = ?", (update_id,)).fetchone()
        if row is None:
            return None
        conn.execute("SELECT 1 FROM stacks WHERE id = ? FOR NO KEY UPDATE", (row[0],))
        locked = conn.execute(
            f"SELECT {UPDATE_COLUMNS} FROM updates WHERE id = ? FOR NO KEY UPDATE", (update_id,)
        ).fetchone()
        return update_from_row(locked) if locked else None

    def _insert_stack(self, conn: Connection, values: Sequence[Any]) -> int | None:
        # ON CONFLICT waits for a concurrent insert of the same name, then skips the row.
        row = conn.execute(
            INSERT_STACK + " ON CONFLICT (org, project, name) DO NOTHING RETURNING id", values
        ).fetchone()
        return None if row is None else int(row[0])

    def _in(self, column: str, values: list[Any]) -> tuple[str, list[Any]]:
        return f"{column} = ANY(?)", [values]


class _Qmark:
    """A psycopg connection as the shared SQL uses it: `?` placeholders, and executemany."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[tuple[Any, ...]]:
        return self._conn.execute(_pyformat(sql), params)

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        rows = list(params)
        if rows:  # an empty batch would still cost a round trip
            with self._conn.cursor() as cur:
                cur.executemany(_pyformat(sql), rows)


@functools.lru_cache(maxsize=256)
def _pyformat(sql: str) -> str:
    """SQL with `?` placeholders (and none in its literals) as psycopg takes it: `?` becomes
    `%s`, and a literal `%` is doubled."""
    return sql.replace("%", "%%").replace("?", "%s")


def _unavailable(error: Exception) -> PulumidError:
    """Storage failures answer 503 with a fixed message; the detail goes to the log only."""
    log.error(
        "database error: {kind}: {error}", kind=type(error).__name__, error=str(error).strip()
    )
    return Unavailable(STORAGE_FAILED)
