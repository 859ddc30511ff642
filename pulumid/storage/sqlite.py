"""The embedded store: one SQLite file in WAL mode, used from one dedicated thread.

The Store operations are SQLStore's (sql.py); here are opening the file (its lock, its
modes, WAL), the migrations, and transactions: BEGIN IMMEDIATE, so writes are serialised.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from twisted.logger import Logger

from pulumid.errors import PulumidError, Unavailable
from pulumid.storage.faults import Faults
from pulumid.storage.records import UpdateRecord
from pulumid.storage.rows import STORAGE_FAILED
from pulumid.storage.schema import MIGRATIONS, SCHEMA_VERSION
from pulumid.storage.sql import INSERT_STACK, Connection, SchemaTooNew, SQLStore, find_update
from pulumid.threads import Runner

__all__ = ["SQLiteStore", "SchemaTooNew", "StorageUnusable", "connect", "migrate"]

T = TypeVar("T")
log = Logger()

# After a commit leaves the WAL bigger than this, it is checkpointed and truncated.
WAL_TRUNCATE_BYTES = 64 * 1024 * 1024


class StorageUnusable(Exception):
    """The database cannot be opened safely: the message says why and what to do."""


def _private_file(path: Path) -> None:
    """Create `path` readable by its owner only, or take group/other access off it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, mode & 0o700)


def data_files(path: Path) -> list[Path]:
    """The database and the files SQLite keeps beside it."""
    return [path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))]


def lock_database(path: Path) -> IO[str]:
    """Hold an exclusive lock on `<db>.lock` for the life of the process.

    Two daemons on one file would each trust their in-memory leases and journals, and
    diverge: the second one is refused.
    """
    lock_path = path.with_name(path.name + ".lock")
    _private_file(lock_path)
    handle = open(lock_path, "r+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = handle.read().strip() or "another process"
        handle.close()
        raise StorageUnusable(
            f"the database {path} is in use by another pulumid (pid {holder}); "
            "stop it first, or give this one its own --database"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def connect(path: Path, *, sync_commits: bool) -> sqlite3.Connection:
    for existing in data_files(path):
        if existing == path or existing.exists():
            _private_file(existing)  # SQLite gives -wal and -shm the database's mode
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        conn.close()
        raise StorageUnusable(
            f"SQLite could not put {path} in WAL mode (it reports {mode!r}); WAL needs a "
            "local file system that supports shared memory: move the database to one"
        )
    # NORMAL in WAL mode: a committed transaction survives a crash of the process;
    # FULL also survives power loss, at the cost of an fsync per commit.
    conn.execute(f"PRAGMA synchronous={'FULL' if sync_commits else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    # Checkpoints shrink the WAL back to this size instead of leaving it at its peak.
    conn.execute(f"PRAGMA journal_size_limit={WAL_TRUNCATE_BYTES}")
    return conn


def migrate(conn: sqlite3.Connection, path: Path | None) -> int:
    """Bring the schema up to date; copy the file aside before changing an existing one."""
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    current = int(row[0]) if row else 0
    if current > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the database schema is version {current}, newer than this pulumid "
            f"understands ({SCHEMA_VERSION}); upgrade pulumid"
        )
    if current == SCHEMA_VERSION:
        return current
    if current > 0 and path is not None and path.exists():
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        copy = path.with_name(f"{path.name}.before-v{SCHEMA_VERSION}")
        shutil.copy2(path, copy)
        os.chmod(copy, 0o600)
    for version in range(current, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            step = MIGRATIONS[version]
            if callable(step):
                step(conn)
            else:
                for statement in _statements(step):
                    conn.execute(statement)
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(version + 1),),
            )
            conn.execute("COMMIT")
        except BaseException:
            _rollback_quietly(conn)
            raise
    return SCHEMA_VERSION


def _end_open_transaction(conn: sqlite3.Connection) -> None:
    """Roll back what a failed COMMIT and ROLLBACK left open: no one may see or extend it."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _rollback_quietly(conn: sqlite3.Connection, faults: Faults | None = None) -> None:
    """Roll back after an error without hiding that error: if the ROLLBACK fails too, it is
    logged, and the next use of the connection rolls back before it begins."""
    try:
        if not conn.in_transaction:  # raises on a closed connection
            return
        if faults is not None:
            faults.hit("rollback")
        conn.execute("ROLLBACK")
    except sqlite3.Error as e:
        log.error("ROLLBACK failed after an error: {error}", error=str(e))


def _statements(script: str) -> Iterable[str]:
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    for statement in "\n".join(lines).split(";"):
        if statement.strip():
            yield statement


class SQLiteStore(SQLStore):
    expected_schema = SCHEMA_VERSION
    unique_violation = sqlite3.IntegrityError
    in_batch = 500  # one placeholder per id: well below SQLite's limit on parameters
    exclusive = True  # one daemon per database file

    def __init__(
        self,
        conn: sqlite3.Connection,
        runner: Runner,
        *,
        path: Path | None = None,
        lock: IO[str] | None = None,
        faults: Faults | None = None,
    ) -> None:
        super().__init__(runner, faults)
        self._conn = conn
        self._path = path
        self._lock = lock
        # Held by every use of the connection and by close(): closing a connection that a
        # worker thread is using crashes the process (seen: a segfault in executemany).
        self._using = threading.Lock()

    @classmethod
    def open(
        cls,
        path: Path,
        runner: Runner,
        *,
        sync_commits: bool = True,
        faults: Faults | None = None,
    ) -> SQLiteStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = lock_database(path)
        try:
            conn = connect(path, sync_commits=sync_commits)
            migrate(conn, path)
        except BaseException:
            lock.close()
            raise
        return cls(conn, runner, path=path, lock=lock, faults=faults)

    def close(self) -> None:
        with self._using:
            self._conn.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- plumbing -------------------------------------------------------------------------

    def _reading(self, f: Callable[..., T], *args: Any) -> T:
        with self._using:
            try:
                _end_open_transaction(self._conn)
                return f(self._conn, *args)
            except sqlite3.Error as e:
                raise _unavailable(e) from e

    def _in_transaction(self, f: Callable[..., T], *args: Any) -> T:
        with self._using:
            return self._transaction(f, *args)

    def _transaction(self, f: Callable[..., T], *args: Any) -> T:
        conn = self._conn
        try:
            _end_open_transaction(conn)
            conn.execute("BEGIN IMMEDIATE")
            result = f(conn, *args)
            self.faults.hit("commit")
            conn.execute("COMMIT")
        except BaseException as error:
            _rollback_quietly(conn, self.faults)
            if isinstance(error, sqlite3.Error):
                raise _unavailable(error) from error
            raise
        self.faults.hit("committed")
        self._truncate_wal_if_large()
        return result

    def _truncate_wal_if_large(self) -> None:
        if self._path is None:
            return
        try:
            size = os.stat(self._path.with_name(self._path.name + "-wal")).st_size
        except OSError:
            return
        if size > WAL_TRUNCATE_BYTES:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.warn("WAL checkpoint failed: {error}", error=str(e))

    # -- the dialect ----------------------------------------------------------------------

    # BEGIN IMMEDIATE already serialises writers: plain reads need no row locks.

    def _row_lock(self, mode: str) -> str:
        return ""

    def _lock_update(self, conn: Connection, update_id: str) -> UpdateRecord | None:
        return find_update(conn, update_id)

    def _insert_stack(self, conn: Connection, values: Sequence[Any]) -> int | None:
        # Not ON CONFLICT DO NOTHING: a skipped row would still use up an AUTOINCREMENT id.
        try:
            row = conn.execute(INSERT_STACK + " RETURNING id", values).fetchone()
        except sqlite3.IntegrityError:
            return None
        return int(row[0])

    def _in(self, column: str, values: list[Any]) -> tuple[str, list[Any]]:
        return f"{column} IN ({','.join('?' * len(values))})", values


def _unavailable(error: sqlite3.Error) -> PulumidError:
    """Storage failures answer 503: nothing was written, and a retry may succeed."""
    log.error("database error: {error}", error=str(error))
    return Unavailable(STORAGE_FAILED)
