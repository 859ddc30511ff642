"""The embedded store: one SQLite file in WAL mode, used from one dedicated thread.

Every public method hands a `_txn` function to the database runner; `_txn` functions run on
that thread only, never touch the reactor, and return plain values.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, TypeVar

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
from pulumid.storage.schema import MIGRATIONS, SCHEMA_VERSION
from pulumid.threads import Runner

T = TypeVar("T")
log = Logger()

# After a commit leaves the WAL bigger than this, it is checkpointed and truncated.
WAL_TRUNCATE_BYTES = 64 * 1024 * 1024


class SchemaTooNew(Exception):
    pass


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
    if not conn.in_transaction:
        return
    try:
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


class SQLiteStore:
    def __init__(
        self,
        conn: sqlite3.Connection,
        runner: Runner,
        *,
        path: Path | None = None,
        lock: IO[str] | None = None,
        faults: Faults | None = None,
    ) -> None:
        self._conn = conn
        self._runner = runner
        self._path = path
        self._lock = lock
        self.faults = faults or Faults()

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
        self._conn.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- plumbing -------------------------------------------------------------------------

    def _read(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._runner.run(self._reading, f, *args)

    def _write(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._runner.run(self._in_transaction, f, *args)

    def _reading(self, f: Callable[..., T], *args: Any) -> T:
        try:
            _end_open_transaction(self._conn)
            return f(self._conn, *args)
        except sqlite3.Error as e:
            raise _unavailable(e) from e

    def _in_transaction(self, f: Callable[..., T], *args: Any) -> T:
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

    # -- meta -----------------------------------------------------------------------------

    def get_meta(self, key: str) -> Deferred[bytes | None]:
        def txn(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return bytes(row[0]) if row else None

        return self._read(txn)

    def set_meta_if_absent(self, key: str, value: bytes) -> Deferred[bytes]:
        def txn(conn: sqlite3.Connection) -> bytes:
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return bytes(row[0])

        return self._write(txn)

    # -- stacks ---------------------------------------------------------------------------

    def create_stack(
        self, ref: StackRef, tags: dict[str, str], now: float, initial: StateBlob | None
    ) -> Deferred[StackRecord]:
        return self._write(self._create_stack_txn, ref, tags, now, initial)

    @staticmethod
    def _create_stack_txn(
        conn: sqlite3.Connection,
        ref: StackRef,
        tags: dict[str, str],
        now: float,
        initial: StateBlob | None,
    ) -> StackRecord:
        try:
            cur = conn.execute(
                "INSERT INTO stacks (org, project, name, created, resource_count) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    ref.org,
                    ref.project,
                    ref.name,
                    int(now),
                    initial.resource_count if initial else None,
                ),
            )
        except sqlite3.IntegrityError:
            raise Conflict(f"Conflict: stack '{ref}' already exists") from None
        stack_id = cur.lastrowid
        assert stack_id is not None
        _write_tags(conn, stack_id, tags)
        conn.execute(
            "DELETE FROM stack_aliases WHERE org = ? AND project = ? AND name = ?",
            (ref.org, ref.project, ref.name),
        )
        if initial is not None:
            conn.execute(
                "INSERT INTO states (stack_id, version, data, resource_count) VALUES (?, 0, ?, ?)",
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
        def txn(conn: sqlite3.Connection) -> list[StackRecord]:
            sql = [f"SELECT {STACK_COLUMNS} FROM stacks s WHERE id > ?"]
            args: list[Any] = [after_id]
            sql.append(f"AND org IN ({','.join('?' * len(orgs))})")
            args.extend(orgs)
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
            sql.append("ORDER BY id LIMIT ?")
            args.append(limit)
            rows = conn.execute(" ".join(sql), args).fetchall()
            tags = _read_tags(conn, [row[0] for row in rows])
            return [stack_from_row(row, tags.get(row[0], {})) for row in rows]

        return self._read(txn)

    def project_exists(self, org: str, project: str) -> Deferred[bool]:
        def txn(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM stacks WHERE org = ? AND project = ? LIMIT 1", (org, project)
            ).fetchone()
            return row is not None

        return self._read(txn)

    def delete_stack(self, stack_id: int, force: bool) -> Deferred[None]:
        def txn(conn: sqlite3.Connection) -> None:
            stack = _get_stack_by_id(conn, stack_id)
            if not force and (stack.resource_count or 0) > 0:
                raise BadRequest(STACK_HAS_RESOURCES)
            if stack.locked_by and not force:
                raise Conflict(ANOTHER_UPDATE)
            conn.execute("DELETE FROM stacks WHERE id = ?", (stack_id,))

        return self._write(txn)

    def set_tags(self, stack_id: int, tags: dict[str, str]) -> Deferred[None]:
        def txn(conn: sqlite3.Connection) -> None:
            _get_stack_by_id(conn, stack_id)
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
        def txn(conn: sqlite3.Connection) -> None:
            stack = _get_stack_by_id(conn, stack_id)
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
                "INSERT OR REPLACE INTO stack_aliases (org, project, name, stack_id) "
                "VALUES (?, ?, ?, ?)",
                (stack.org, stack.project, stack.name, stack_id),
            )
            conn.execute(
                "UPDATE stacks SET project = ?, name = ? WHERE id = ?",
                (new_ref.project, new_ref.name, stack_id),
            )
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
        def txn(conn: sqlite3.Connection) -> StateBlob | None:
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

    def get_stack_key(self, stack_id: int) -> Deferred[bytes | None]:
        def txn(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT wrapped FROM stack_keys WHERE stack_id = ?", (stack_id,)
            ).fetchone()
            return bytes(row[0]) if row else None

        return self._read(txn)

    def put_stack_key_if_absent(self, stack_id: int, wrapped: bytes) -> Deferred[bytes]:
        def txn(conn: sqlite3.Connection) -> bytes:
            conn.execute(
                "INSERT OR IGNORE INTO stack_keys (stack_id, wrapped) VALUES (?, ?)",
                (stack_id, wrapped),
            )
            row = conn.execute(
                "SELECT wrapped FROM stack_keys WHERE stack_id = ?", (stack_id,)
            ).fetchone()
            return bytes(row[0])

        return self._write(txn)

    # -- updates --------------------------------------------------------------------------

    def create_update(self, update: UpdateRecord) -> Deferred[None]:
        def txn(conn: sqlite3.Connection) -> None:
            _get_stack_by_id(conn, update.stack_id)
            _insert_update(conn, update, status=update.status, version=update.version)

        return self._write(txn)

    def get_update(self, update_id: str) -> Deferred[UpdateRecord | None]:
        def txn(conn: sqlite3.Connection) -> UpdateRecord | None:
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
        def txn(conn: sqlite3.Connection) -> UpdateRecord:
            update = _find_update(conn, update_id)
            if update is None:
                raise NotFound("Not Found: update not found")
            if update.status != "not-started":
                raise Conflict("Conflict: The Update has already been started.")
            stack = _get_stack_by_id(conn, update.stack_id)
            version = stack.version
            if not update.dry_run:
                _take_over(conn, stack, now)
                version = stack.version + 1
                # Version N starts as a copy of N-1: export works before any checkpoint, and
                # it is the base that journal entries are replayed onto.
                conn.execute(
                    "INSERT OR REPLACE INTO states (stack_id, version, data, resource_count) "
                    "SELECT stack_id, ?, data, resource_count FROM states "
                    "WHERE stack_id = ? AND version = ?",
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
            started = _find_update(conn, update_id)
            assert started is not None
            return started

        return self._write(txn)

    def check_lease(
        self, update_id: str, token_hash: str, now: float, ref: StackRef | None = None
    ) -> Deferred[UpdateRecord]:
        def txn(conn: sqlite3.Connection) -> UpdateRecord:
            if ref is not None:
                row = conn.execute(
                    "SELECT 1 FROM updates u JOIN stacks s ON s.id = u.stack_id "
                    "WHERE u.id = ? AND s.org = ? AND s.project = ? AND s.name = ?",
                    (update_id, ref.org, ref.project, ref.name),
                ).fetchone()
                if row is None:
                    raise NotFound(f"Not Found: update '{update_id}' not found")
            return check_lease(_find_update(conn, update_id), token_hash, now)

        return self._read(txn)

    def renew_lease(
        self, update_id: str, token_hash: str, now: float, lease_expires: float
    ) -> Deferred[None]:
        def txn(conn: sqlite3.Connection) -> None:
            check_lease(_find_update(conn, update_id), token_hash, now)
            conn.execute(
                "UPDATE updates SET lease_expires = ? WHERE id = ?", (lease_expires, update_id)
            )

        return self._write(txn)

    def save_checkpoint(
        self, update_id: str, token_hash: str, now: float, state: StateBlob, sequence: int = 0
    ) -> Deferred[bool]:
        def txn(conn: sqlite3.Connection) -> bool:
            update = check_checkpointing(_find_update(conn, update_id), token_hash, now)
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
                "UPDATE updates SET checkpoint_seq = MAX(checkpoint_seq, ?) WHERE id = ?",
                (sequence, update_id),
            )
            return True

        return self._write(txn)

    def save_delta(
        self, update_id: str, token_hash: str, now: float, sequence: int, body: bytes
    ) -> Deferred[bool]:
        def txn(conn: sqlite3.Connection) -> bool:
            update = check_checkpointing(_find_update(conn, update_id), token_hash, now)
            if sequence <= update.checkpoint_seq:
                return False
            conn.execute(
                "INSERT OR REPLACE INTO checkpoint_deltas (update_id, seq, body) VALUES (?, ?, ?)",
                (update_id, sequence, body),
            )
            conn.execute(
                "UPDATE updates SET checkpoint_seq = ? WHERE id = ?", (sequence, update_id)
            )
            return True

        return self._write(txn)

    def has_deltas(self, update_id: str) -> Deferred[bool]:
        def txn(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM checkpoint_deltas WHERE update_id = ? LIMIT 1", (update_id,)
            ).fetchone()
            return row is not None

        return self._read(txn)

    def get_deltas(self, update_id: str) -> Deferred[list[tuple[int, bytes]]]:
        def txn(conn: sqlite3.Connection) -> list[tuple[int, bytes]]:
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
        def txn(conn: sqlite3.Connection) -> int:
            update = check_writable(_find_update(conn, update_id), token_hash, now)
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

    def get_journal(self, update_id: str) -> Deferred[list[bytes]]:
        def txn(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute(
                "SELECT body FROM journal_batches WHERE update_id = ? ORDER BY batch",
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

        def txn(conn: sqlite3.Connection) -> None:
            update = _find_update(conn, update_id)
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
        def txn(conn: sqlite3.Connection) -> None:
            update = _find_update(conn, update_id)
            if update is None:
                raise NotFound("Not Found: update not found")
            if update.status != "running":
                raise Conflict(not_running_message(update.status))
            _finish(conn, update, "cancelled", now, state, keep_versions, failure)

        return self._write(txn)

    def list_expired(self, now: float) -> Deferred[list[UpdateRecord]]:
        def txn(conn: sqlite3.Connection) -> list[UpdateRecord]:
            rows = conn.execute(
                f"SELECT {UPDATE_COLUMNS} FROM updates "
                "WHERE status = 'running' AND lease_expires <= ?",
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
        def txn(conn: sqlite3.Connection) -> bool:
            update = _find_update(conn, update_id)
            if update is None or update.status != "running" or (update.lease_expires or 0) > now:
                return False  # renewed, finished or taken over meanwhile
            _finish(conn, update, "failed", now, state, keep_versions, failure)
            return True

        return self._write(txn)

    def import_state(
        self, update: UpdateRecord, state: StateBlob, keep_versions: int
    ) -> Deferred[int]:
        def txn(conn: sqlite3.Connection) -> int:
            stack = _get_stack_by_id(conn, update.stack_id)
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

        def txn(conn: sqlite3.Connection) -> list[UpdateRecord]:
            sql = (
                f"SELECT {UPDATE_COLUMNS} FROM updates WHERE stack_id = ? "
                "AND status != 'not-started'"
                + ("" if previews else " AND dry_run = 0")
                + " ORDER BY version DESC, created DESC"
            )
            args: tuple[Any, ...] = (stack_id,)
            if page > 0:
                sql += " LIMIT ? OFFSET ?"
                args = (stack_id, page_size, (page - 1) * page_size)
            return [update_from_row(row) for row in conn.execute(sql, args).fetchall()]

        return self._read(txn)

    def get_update_by_version(self, stack_id: int, version: int) -> Deferred[UpdateRecord | None]:
        def txn(conn: sqlite3.Connection) -> UpdateRecord | None:
            row = conn.execute(
                f"SELECT {UPDATE_COLUMNS} FROM updates WHERE stack_id = ? AND version = ? "
                "AND dry_run = 0 AND status != 'not-started' ORDER BY created DESC LIMIT 1",
                (stack_id, version),
            ).fetchone()
            return update_from_row(row) if row else None

        return self._read(txn)

    def find_update_by_token(self, token_hash: str) -> Deferred[UpdateRecord | None]:
        """The update (running or ended) whose token hashes to `token_hash`, if any."""

        def txn(conn: sqlite3.Connection) -> UpdateRecord | None:
            row = conn.execute(
                f"SELECT {UPDATE_COLUMNS} FROM updates WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
            return update_from_row(row) if row else None

        return self._read(txn)

    def prune(self, rules: RetentionRules) -> Deferred[dict[str, int]]:
        """Delete what retention lets go of; one transaction, counts by kind."""

        def txn(conn: sqlite3.Connection) -> dict[str, int]:
            counts = dict.fromkeys(("events", "previews", "updates", "unstarted", "claims"), 0)
            for kind, statement, cutoff in retention_deletes(rules, "?"):
                counts[kind] = conn.execute(statement, (cutoff,)).rowcount
            return counts

        return self._write(txn)

    def claim(self, name: str, holder: str, now: float, until: float) -> Deferred[bool]:
        def txn(conn: sqlite3.Connection) -> bool:
            row = conn.execute(claim_statement("?"), (name, holder, until, holder, now)).fetchone()
            return row is not None

        return self._write(txn)

    def referenced_blobs(self, prefix: bytes) -> Deferred[list[bytes]]:
        def txn(conn: sqlite3.Connection) -> list[bytes]:
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
        def txn(conn: sqlite3.Connection) -> None:
            for update_id, events in batches:
                if _find_update(conn, update_id) is None:
                    raise NotFound(f"Not Found: update '{update_id}' not found")
                conn.executemany(
                    "INSERT OR IGNORE INTO events (update_id, seq, data) VALUES (?, ?, ?)",
                    [(update_id, event.sequence, event.data) for event in events],
                )
            for update_id, changes in summaries.items():
                conn.execute(
                    "UPDATE updates SET resource_changes = ? WHERE id = ?",
                    (json.dumps(changes), update_id),
                )

        return self._write(txn)

    def get_events(self, update_id: str, after: int, limit: int) -> Deferred[list[StoredEvent]]:
        def txn(conn: sqlite3.Connection) -> list[StoredEvent]:
            rows = conn.execute(
                "SELECT seq, data FROM events WHERE update_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (update_id, after, limit),
            ).fetchall()
            return [StoredEvent(row[0], bytes(row[1])) for row in rows]

        return self._read(txn)


# -- transaction helpers (database thread only) ---------------------------------------------


def _unavailable(error: sqlite3.Error) -> PulumidError:
    """Storage failures answer 503: nothing was written, and a retry may succeed."""
    log.error("database error: {error}", error=str(error))
    return Unavailable(STORAGE_FAILED)


def _get_stack_by_id(conn: sqlite3.Connection, stack_id: int) -> StackRecord:
    row = conn.execute(f"SELECT {STACK_COLUMNS} FROM stacks WHERE id = ?", (stack_id,)).fetchone()
    if row is None:
        raise NotFound("Not Found: stack not found")
    return stack_from_row(row, _read_tags(conn, [stack_id]).get(stack_id, {}))


def _get_stack_by_ref(conn: sqlite3.Connection, ref: StackRef, aliases: bool) -> StackRecord | None:
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
            return _get_stack_by_id(conn, alias[0])
    if row is None:
        return None
    return stack_from_row(row, _read_tags(conn, [row[0]]).get(row[0], {}))


def _read_tags(conn: sqlite3.Connection, stack_ids: list[int]) -> dict[int, dict[str, str]]:
    result: dict[int, dict[str, str]] = {}
    for start in range(0, len(stack_ids), 500):
        chunk = stack_ids[start : start + 500]
        rows = conn.execute(
            f"SELECT stack_id, name, value FROM stack_tags "
            f"WHERE stack_id IN ({','.join('?' * len(chunk))})",
            chunk,
        ).fetchall()
        for stack_id, name, value in rows:
            result.setdefault(stack_id, {})[name] = value
    return result


def _write_tags(conn: sqlite3.Connection, stack_id: int, tags: dict[str, str]) -> None:
    conn.execute("DELETE FROM stack_tags WHERE stack_id = ?", (stack_id,))
    conn.executemany(
        "INSERT INTO stack_tags (stack_id, name, value) VALUES (?, ?, ?)",
        [(stack_id, name, value) for name, value in tags.items()],
    )


def _journal_length(conn: sqlite3.Connection, update_id: str) -> int:
    row = conn.execute(
        "SELECT COALESCE(MAX(batch), 0) FROM journal_batches WHERE update_id = ?", (update_id,)
    ).fetchone()
    return int(row[0])


def _find_update(conn: sqlite3.Connection, update_id: str) -> UpdateRecord | None:
    row = conn.execute(
        f"SELECT {UPDATE_COLUMNS} FROM updates WHERE id = ?", (update_id,)
    ).fetchone()
    return update_from_row(row) if row else None


def _insert_update(
    conn: sqlite3.Connection, update: UpdateRecord, *, status: str, version: int
) -> None:
    conn.execute(
        f"INSERT INTO updates ({UPDATE_COLUMNS}) VALUES ({', '.join('?' * UPDATE_COLUMN_COUNT)})",
        update_values(update, status=status, version=version),
    )


def _take_over(conn: sqlite3.Connection, stack: StackRecord, now: float) -> None:
    """Refuse while another real update holds a live lease; end one whose lease ran out.

    The engine materialises an expired journaling update before it gets here; this is the
    backstop for a lease that ran out in between.
    """
    if not stack.locked_by:
        return
    holder = _find_update(conn, stack.locked_by)
    if holder and holder.status == "running" and (holder.lease_expires or 0) > now:
        raise Conflict(ANOTHER_UPDATE)
    if holder is not None and holder.status == "running":
        _finish(conn, holder, "failed", now, None, 0)
    conn.execute("UPDATE stacks SET locked_by = NULL WHERE id = ?", (stack.id,))


def _finish(
    conn: sqlite3.Connection,
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


def _put_state(conn: sqlite3.Connection, stack_id: int, version: int, state: StateBlob) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO states (stack_id, version, data, resource_count) "
        "VALUES (?, ?, ?, ?)",
        (stack_id, version, state.gzipped, state.resource_count),
    )


def _prune(conn: sqlite3.Connection, stack_id: int, version: int, keep: int) -> None:
    if keep > 0:
        conn.execute(
            "DELETE FROM states WHERE stack_id = ? AND version <= ?", (stack_id, version - keep)
        )
