"""The databases pulumid-admin works on, raw: one SQLite file or PostgreSQL database, migrated
to the current schema, its tables read and written in SQL, and a Store over it (per thread,
on read-only connections) for reading it the way the daemon does.

The tables and their columns are listed here once (TABLES); a database whose schema has any
other table or column is refused, so nothing is silently left behind.
"""

from __future__ import annotations

import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from pulumid.config import is_postgres
from pulumid.storage import postgres as pg
from pulumid.storage import sqlite as lite
from pulumid.storage.blobs import BlobStore, S3Blobs
from pulumid.storage.interface import Store
from pulumid.storage.postgres import PostgresStore
from pulumid.storage.rows import (
    AUDIT_COLUMNS,
    IDENTITY_COLUMNS,
    STACK_COLUMNS,
    TOKEN_COLUMNS,
    UPDATE_COLUMNS,
)
from pulumid.storage.split import BlobbedStore
from pulumid.storage.sqlite import SQLiteStore
from pulumid.threads import InlineRunner

T = TypeVar("T")

# Object storage requests in flight at once.
BLOB_THREADS = 8
# Tables that are not copied: claims are timed work of live nodes.
NOT_PORTED = {"meta", "claims", "sqlite_sequence"}


class AdminError(Exception):
    """The command cannot (or must not) go on: the message says why and what to do."""


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]  # primary key: rows stream in its order
    blob: str | None = None  # column holding the bytes or a blob reference (REF + key)
    kind: str = ""  # blob key kind, as BlobbedStore names them
    owner: str = ""  # column naming the owner segment of the blob key
    flags: tuple[str, ...] = ()  # BOOLEAN in PostgreSQL, 0/1 in SQLite
    binary: tuple[str, ...] = ()  # BLOB / BYTEA, or NULL
    # `id` is handed out by the database: the destination goes on after the source's last.
    serial: bool = False


def _columns(spec: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in spec.split(","))


# In foreign key order. BlobbedStore keys states by stack, journal batches and deltas by update.
TABLES = (
    Table("stacks", _columns(STACK_COLUMNS), ("id",), serial=True),
    Table("stack_tags", ("stack_id", "name", "value"), ("stack_id", "name")),
    Table("stack_aliases", ("org", "project", "name", "stack_id"), ("org", "project", "name")),
    Table("stack_keys", ("stack_id", "key_id", "wrapped"), ("stack_id",), binary=("wrapped",)),
    Table(
        "states",
        ("stack_id", "version", "data", "resource_count"),
        ("stack_id", "version"),
        blob="data",
        kind="states",
        owner="stack_id",
        binary=("data",),
    ),
    Table("updates", _columns(UPDATE_COLUMNS), ("id",), flags=("dry_run",)),
    Table("events", ("update_id", "seq", "data"), ("update_id", "seq"), binary=("data",)),
    Table(
        "journal_batches",
        ("update_id", "batch", "body"),
        ("update_id", "batch"),
        blob="body",
        kind="journal",
        owner="update_id",
        binary=("body",),
    ),
    Table(
        "checkpoint_deltas",
        ("update_id", "seq", "body"),
        ("update_id", "seq"),
        blob="body",
        kind="deltas",
        owner="update_id",
        binary=("body",),
    ),
    Table(
        "identities",
        _columns(IDENTITY_COLUMNS),
        ("login",),
        flags=("disabled",),
        binary=("refresh_token",),
    ),
    Table("access_tokens", _columns(TOKEN_COLUMNS), ("id",)),
    Table("audit_events", _columns(AUDIT_COLUMNS), ("id",), flags=("auth_failure",), serial=True),
)


def result(d: Deferred[T]) -> T:
    """The result of a Deferred that has already fired (stores on InlineRunner)."""
    box: list[Any] = []
    d.addBoth(box.append)
    if not box:
        raise RuntimeError("a store call did not complete inline")
    if isinstance(box[0], Failure):
        box[0].raiseException()
    value: T = box[0]
    return value


def describe(database: str) -> str:
    """DATABASE for messages, without its password."""
    if not is_postgres(database):
        return f"SQLite {Path(database).expanduser()}"
    try:
        info = conninfo_to_dict(database)
    except psycopg.Error:
        return "PostgreSQL (unparsable DSN)"
    host = info.get("host") or info.get("hostaddr") or "localhost"
    return f"PostgreSQL {info.get('dbname', '?')} on {host}:{info.get('port') or 5432}"


def pg_address(database: str) -> tuple[str, str, str] | None:
    try:
        info = conninfo_to_dict(database)
    except psycopg.Error:
        return None
    host = str(info.get("host") or info.get("hostaddr") or "localhost")
    if host in ("127.0.0.1", "::1"):
        host = "localhost"
    return host, str(info.get("port") or 5432), str(info.get("dbname") or info.get("user") or "")


# --------------------------------------------------------------------------------------------
# One database, raw


class Database(ABC):
    """One side's tables, read and written in SQL (the dialects differ)."""

    kind = ""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.where = describe(spec)

    @abstractmethod
    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    @abstractmethod
    def stream(self, table: Table, size: int) -> Iterator[list[tuple[Any, ...]]]:
        raise NotImplementedError

    @abstractmethod
    def table_columns(self) -> dict[str, set[str]]:
        raise NotImplementedError

    @abstractmethod
    def begin_snapshot(self) -> None:
        raise NotImplementedError

    @abstractmethod
    def end_snapshot(self) -> None:
        raise NotImplementedError

    @abstractmethod
    def begin_write(self) -> None:
        raise NotImplementedError

    @abstractmethod
    def insert(self, table: Table, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    @abstractmethod
    def upsert_meta(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    @abstractmethod
    def id_floor(self, table: str) -> int:
        """The highest id of TABLE ever handed out (deleted rows' ids are not reused)."""
        raise NotImplementedError

    @abstractmethod
    def raise_id_floor(self, table: str, floor: int) -> None:
        raise NotImplementedError

    @abstractmethod
    def commit(self) -> None:
        raise NotImplementedError

    @abstractmethod
    def rollback(self) -> None:
        raise NotImplementedError

    @abstractmethod
    def metadata_store(self) -> Store:
        """A Store over this database for the calling thread, on read-only connections
        (verification only reads)."""
        raise NotImplementedError

    @abstractmethod
    def close(self) -> None:
        raise NotImplementedError

    def scalar(self, sql: str, args: Sequence[Any] = ()) -> Any:
        rows = self.rows(sql, args)
        return rows[0][0] if rows else None

    def is_empty(self) -> bool:
        """No row in any table that is ported (meta and claims may be there)."""
        exists = " OR ".join(f"EXISTS (SELECT 1 FROM {table.name})" for table in TABLES)
        return not self.rows(f"SELECT 1 WHERE {exists}")

    def meta(self) -> dict[str, bytes]:
        return {
            key: as_bytes(value)
            for key, value in self.rows("SELECT key, value FROM meta WHERE key != 'schema_version'")
        }


def as_bytes(value: Any) -> bytes:
    if isinstance(value, str):  # SQLite keeps what was bound: text stays text
        return value.encode()
    return bytes(value)


class SQLiteDatabase(Database):
    kind = "sqlite"

    def __init__(self, spec: str, *, create: bool, read_only: bool) -> None:
        super().__init__(spec)
        self.path = Path(spec).expanduser()
        if not create and not self.path.is_file():
            raise AdminError(f"there is no SQLite database at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # The daemon holds this lock while it runs: porting needs it stopped.
            self._lock: IO[str] | None = lite.lock_database(self.path)
        except lite.StorageUnusable as e:
            raise AdminError(f"{e} (stop the daemon before porting)") from None
        try:
            self.conn = lite.connect(self.path, sync_commits=True)
            lite.migrate(self.conn, self.path)
            if read_only:
                self.conn.execute("PRAGMA query_only = ON")
        except (sqlite3.Error, lite.SchemaTooNew, lite.StorageUnusable) as e:
            self._lock.close()
            raise AdminError(f"cannot open {self.where}: {e}") from None
        self._local = threading.local()
        self._guard = threading.Lock()
        self._readers: list[sqlite3.Connection] = []

    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self.conn.execute(sql, tuple(args)).fetchall())

    def stream(self, table: Table, size: int) -> Iterator[list[tuple[Any, ...]]]:
        cursor = self.conn.execute(
            f"SELECT {', '.join(table.columns)} FROM {table.name} ORDER BY {', '.join(table.key)}"
        )
        try:
            while batch := cursor.fetchmany(size):
                yield batch
        finally:
            cursor.close()

    def table_columns(self) -> dict[str, set[str]]:
        names = [row[0] for row in self.rows("SELECT name FROM sqlite_master WHERE type='table'")]
        return {name: {row[1] for row in self.rows(f"PRAGMA table_info({name})")} for name in names}

    def begin_snapshot(self) -> None:
        self.conn.execute("BEGIN")  # a WAL read transaction: one consistent snapshot

    def end_snapshot(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def begin_write(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def insert(self, table: Table, rows: list[tuple[Any, ...]]) -> None:
        marks = ", ".join("?" * len(table.columns))
        self.conn.executemany(
            f"INSERT INTO {table.name} ({', '.join(table.columns)}) VALUES ({marks})", rows
        )

    def upsert_meta(self, key: str, value: bytes) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def id_floor(self, table: str) -> int:
        return int(self.scalar("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)) or 0)

    def raise_id_floor(self, table: str, floor: int) -> None:
        # Inserting explicit ids already raised it to the largest id; a floor above that
        # comes from rows deleted on the source.
        updated = self.conn.execute(
            "UPDATE sqlite_sequence SET seq = ? WHERE name = ? AND seq < ?", (floor, table, floor)
        ).rowcount
        if not updated and floor > 0 and self.id_floor(table) < floor:
            self.conn.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, floor)
            )

    def commit(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def metadata_store(self) -> Store:
        store: Store | None = getattr(self._local, "store", None)
        if store is None:
            # A connection per thread: one sqlite3 connection is not for concurrent use.
            conn = lite.connect(self.path, sync_commits=True)
            conn.execute("PRAGMA query_only = ON")
            with self._guard:
                self._readers.append(conn)
            store = self._local.store = SQLiteStore(conn, InlineRunner())
        return store

    def close(self) -> None:
        with self._guard:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        self.conn.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


class PostgresDatabase(Database):
    kind = "postgres"

    def __init__(self, spec: str, *, read_only: bool) -> None:
        super().__init__(spec)
        self._store: PostgresStore | None = None
        self._guard = threading.Lock()
        try:
            self.conn = pg.connect(spec)
        except psycopg.Error as e:
            raise AdminError(f"cannot connect to {self.where}: {e}") from None
        try:
            pg.migrate(self.conn)
            if read_only:
                self.conn.execute("SET default_transaction_read_only = on")
        except (psycopg.Error, pg.SchemaTooNew) as e:
            self.conn.close()
            raise AdminError(f"cannot open {self.where}: {e}") from None

    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self.conn.execute(sql, tuple(args)).fetchall())

    def stream(self, table: Table, size: int) -> Iterator[list[tuple[Any, ...]]]:
        # A server-side cursor: the table is never held in memory at once.
        with self.conn.cursor(name=f"pulumid_port_{table.name}") as cursor:
            cursor.execute(
                f"SELECT {', '.join(table.columns)} FROM {table.name} "
                f"ORDER BY {', '.join(table.key)}"
            )
            while batch := cursor.fetchmany(size):
                yield batch

    def table_columns(self) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for table, column in self.rows(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema()"
        ):
            found.setdefault(table, set()).add(column)
        return found

    def session(self) -> tuple[int, Any]:
        row = self.rows(
            "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )[0]
        return int(row[0]), row[1]

    def sees_session(self, session: tuple[int, Any]) -> bool:
        """Whether SESSION (of another connection) is connected to this very database."""
        return bool(
            self.rows(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND backend_start = %s "
                "AND datname = current_database()",
                session,
            )
        )

    def begin_snapshot(self) -> None:
        self.conn.autocommit = False
        self.conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        self.conn.read_only = True

    def end_snapshot(self) -> None:
        self.conn.rollback()
        self.conn.autocommit = True
        self.conn.read_only = None
        self.conn.isolation_level = None

    def begin_write(self) -> None:
        self.conn.autocommit = False
        # Nodes started on the destination meanwhile wait instead of writing beside the port.
        self.conn.execute(
            "LOCK TABLE stacks, updates, identities, access_tokens, audit_events "
            "IN SHARE ROW EXCLUSIVE MODE"
        )

    def insert(self, table: Table, rows: list[tuple[Any, ...]]) -> None:
        with (
            self.conn.cursor() as cursor,
            cursor.copy(f"COPY {table.name} ({', '.join(table.columns)}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)

    def upsert_meta(self, key: str, value: bytes) -> None:
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def id_floor(self, table: str) -> int:
        last = self.scalar(
            "SELECT pg_sequence_last_value(pg_get_serial_sequence(%s, 'id')::regclass)", (table,)
        )
        return int(last or 0)

    def raise_id_floor(self, table: str, floor: int) -> None:
        # COPY with explicit ids leaves the sequence where it was: set it past them.
        top = max(floor, int(self.scalar(f"SELECT COALESCE(MAX(id), 0) FROM {table}")))
        # setval(n, true): the next row gets n + 1; (1, false): it gets 1.
        self.conn.execute(
            "SELECT setval(pg_get_serial_sequence(%s, 'id'), %s, %s)",
            (table, max(top, 1), top > 0),
        )

    def commit(self) -> None:
        self.conn.commit()
        self.conn.autocommit = True

    def rollback(self) -> None:
        if not self.conn.closed and not self.conn.broken:
            self.conn.rollback()
            self.conn.autocommit = True

    def metadata_store(self) -> Store:
        # PostgresStore keeps a connection per calling thread.
        with self._guard:
            if self._store is None:
                options = conninfo_to_dict(self.spec).get("options") or ""
                dsn = make_conninfo(
                    self.spec, options=f"{options} -c default_transaction_read_only=on".strip()
                )
                self._store = PostgresStore(dsn, InlineRunner())
            return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        self.conn.close()


def open_database(spec: str, *, create: bool, read_only: bool) -> Database:
    if is_postgres(spec):
        return PostgresDatabase(spec, read_only=read_only)
    return SQLiteDatabase(spec, create=create, read_only=read_only)


def open_blobs(url: str | None) -> BlobStore | None:
    if url is None or url == "inline":
        return None
    try:
        return S3Blobs.open(url, InlineRunner(), max_connections=BLOB_THREADS)
    except ValueError as e:
        raise AdminError(f"blob store {url!r}: {e}") from None


def check_schema(db: Database) -> None:
    """Refuse a schema with tables or columns this tool would not copy (silently lost)."""
    known = {table.name: set(table.columns) for table in TABLES}
    for name, columns in db.table_columns().items():
        if name in NOT_PORTED:
            continue
        if name not in known:
            raise AdminError(f"{db.where} has a table {name!r} this pulumid-admin cannot port")
        extra = columns - known[name]
        missing = known[name] - columns
        if extra or missing:
            raise AdminError(
                f"{db.where}: table {name!r} does not have the columns this pulumid-admin "
                f"ports (unknown: {sorted(extra)}, missing: {sorted(missing)})"
            )


@dataclass
class Side:
    db: Database
    blobs: BlobStore | None
    blob_url: str

    @property
    def label(self) -> str:
        where = "blobs inline" if self.blobs is None else f"blobs in {self.blob_url}"
        return f"{self.db.where}, {where}"

    def store(self) -> Store:
        meta = self.db.metadata_store()
        return meta if self.blobs is None else BlobbedStore(meta, self.blobs)
