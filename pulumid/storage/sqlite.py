"""The embedded store: one SQLite file in WAL mode, used from one dedicated thread.

Every public method hands a `_txn` function to the database runner; `_txn` functions run on
that thread only, never touch the reactor, and return plain values.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred

from pulumid.errors import BadRequest, Conflict, Forbidden, NotFound
from pulumid.storage.records import (
    StackRecord,
    StackRef,
    StateBlob,
    StoredEvent,
    UpdateRecord,
)
from pulumid.storage.schema import MIGRATIONS, SCHEMA_VERSION
from pulumid.threads import Runner

T = TypeVar("T")

STACK_HAS_RESOURCES = "Bad Request: Stack still contains resources."
ANOTHER_UPDATE = "Conflict: Another update is currently in progress."

_STACK_COLUMNS = (
    "id, org, project, name, version, locked_by, last_update, resource_count, "
    "last_update_time, created"
)
_UPDATE_COLUMNS = (
    "id, stack_id, kind, dry_run, status, version, program, config, metadata, created, token, "
    "lease_expires, start_time, end_time, resource_changes, journal_version, requested_by, "
    "engine_version, checkpoint_seq"
)


class SchemaTooNew(Exception):
    pass


def connect(path: Path, *, sync_commits: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a committed transaction survives a crash of the process;
    # FULL also survives power loss, at the cost of an fsync per commit.
    conn.execute(f"PRAGMA synchronous={'FULL' if sync_commits else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
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
        shutil.copy2(path, path.with_name(f"{path.name}.before-v{SCHEMA_VERSION}"))
    for version in range(current, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(version + 1),),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


def _statements(script: str) -> Iterable[str]:
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    for statement in "\n".join(lines).split(";"):
        if statement.strip():
            yield statement


def _stack(row: tuple[Any, ...], tags: dict[str, str]) -> StackRecord:
    return StackRecord(
        id=row[0],
        org=row[1],
        project=row[2],
        name=row[3],
        tags=tags,
        version=row[4],
        locked_by=row[5],
        last_update=row[6],
        resource_count=row[7],
        last_update_time=row[8],
        created=row[9],
    )


def _update(row: tuple[Any, ...]) -> UpdateRecord:
    return UpdateRecord(
        id=row[0],
        stack_id=row[1],
        kind=row[2],
        dry_run=bool(row[3]),
        status=row[4],
        version=row[5],
        program=json.loads(row[6]),
        config=json.loads(row[7]),
        metadata=json.loads(row[8]),
        created=row[9],
        token=row[10],
        lease_expires=row[11],
        start_time=row[12],
        end_time=row[13],
        resource_changes=json.loads(row[14]) if row[14] else None,
        journal_version=row[15],
        requested_by=row[16],
        engine_version=row[17],
        checkpoint_seq=row[18],
    )


class SQLiteStore:
    def __init__(self, conn: sqlite3.Connection, runner: Runner) -> None:
        self._conn = conn
        self._runner = runner

    @classmethod
    def open(cls, path: Path, runner: Runner, *, sync_commits: bool = False) -> SQLiteStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(path, sync_commits=sync_commits)
        migrate(conn, path)
        return cls(conn, runner)

    def close(self) -> None:
        self._conn.close()

    # -- plumbing -------------------------------------------------------------------------

    def _read(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._runner.run(f, self._conn, *args)

    def _write(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._runner.run(self._in_transaction, f, *args)

    def _in_transaction(self, f: Callable[..., T], *args: Any) -> T:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = f(conn, *args)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

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
            sql = [f"SELECT {_STACK_COLUMNS} FROM stacks s WHERE id > ?"]
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
            return [_stack(row, tags.get(row[0], {})) for row in rows]

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
        token: str,
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
                "UPDATE updates SET status = 'running', token = ?, lease_expires = ?, "
                "start_time = ?, version = ?, journal_version = ?, engine_version = ? "
                "WHERE id = ?",
                (token, lease_expires, now, version, journal_version, engine_version, update_id),
            )
            started = _find_update(conn, update_id)
            assert started is not None
            return started

        return self._write(txn)

    def check_lease(
        self, update_id: str, token: str, now: float, ref: StackRef | None = None
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
            return _check_lease(conn, update_id, token, now)

        return self._read(txn)

    def renew_lease(
        self, update_id: str, token: str, now: float, lease_expires: float
    ) -> Deferred[None]:
        def txn(conn: sqlite3.Connection) -> None:
            _check_lease(conn, update_id, token, now)
            conn.execute(
                "UPDATE updates SET lease_expires = ? WHERE id = ?", (lease_expires, update_id)
            )

        return self._write(txn)

    def save_checkpoint(
        self, update_id: str, token: str, now: float, state: StateBlob, sequence: int = 0
    ) -> Deferred[None]:
        def txn(conn: sqlite3.Connection) -> None:
            update = _check_writable(conn, update_id, token, now)
            _put_state(conn, update.stack_id, update.version, state)
            conn.execute(
                "UPDATE stacks SET resource_count = ? WHERE id = ? AND version = ?",
                (state.resource_count, update.stack_id, update.version),
            )
            # A full state supersedes the deltas saved before it.
            conn.execute("DELETE FROM checkpoint_deltas WHERE update_id = ?", (update_id,))
            conn.execute(
                "UPDATE updates SET checkpoint_seq = ? WHERE id = ?", (sequence, update_id)
            )

        return self._write(txn)

    def save_delta(
        self, update_id: str, token: str, now: float, sequence: int, body: bytes
    ) -> Deferred[None]:
        def txn(conn: sqlite3.Connection) -> None:
            _check_writable(conn, update_id, token, now)
            conn.execute(
                "INSERT OR REPLACE INTO checkpoint_deltas (update_id, seq, body) VALUES (?, ?, ?)",
                (update_id, sequence, body),
            )
            conn.execute(
                "UPDATE updates SET checkpoint_seq = ? WHERE id = ?", (sequence, update_id)
            )

        return self._write(txn)

    def get_deltas(self, update_id: str) -> Deferred[list[tuple[int, bytes]]]:
        def txn(conn: sqlite3.Connection) -> list[tuple[int, bytes]]:
            rows = conn.execute(
                "SELECT seq, body FROM checkpoint_deltas WHERE update_id = ? ORDER BY seq",
                (update_id,),
            ).fetchall()
            return [(row[0], bytes(row[1])) for row in rows]

        return self._read(txn)

    def append_journal(self, update_id: str, token: str, now: float, body: bytes) -> Deferred[None]:
        def txn(conn: sqlite3.Connection) -> None:
            update = _check_writable(conn, update_id, token, now)
            if not update.journal_version:
                raise BadRequest("Bad Request: journaling was not enabled for this update")
            conn.execute(
                "INSERT INTO journal_batches (update_id, batch, body) VALUES (?, "
                "(SELECT COALESCE(MAX(batch), 0) + 1 FROM journal_batches WHERE update_id = ?), ?)",
                (update_id, update_id, body),
            )

        return self._write(txn)

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
        token: str,
        now: float,
        status: str,
        keep_versions: int,
        state: StateBlob | None = None,
    ) -> Deferred[None]:
        def txn(conn: sqlite3.Connection) -> None:
            update = _find_update(conn, update_id)
            if update is None or update.token != token:
                raise Forbidden("Forbidden: the update token is not valid for this update")
            if update.status == status:
                return  # a retried complete that already took effect
            if update.status != "running":
                raise Conflict(_not_running_message(update.status))
            _finish(conn, update, status, now, state, keep_versions)

        return self._write(txn)

    def cancel_update(
        self, update_id: str, now: float, state: StateBlob | None = None, keep_versions: int = 0
    ) -> Deferred[None]:
        def txn(conn: sqlite3.Connection) -> None:
            update = _find_update(conn, update_id)
            if update is None:
                raise NotFound("Not Found: update not found")
            if update.status != "running":
                raise Conflict(_not_running_message(update.status))
            _finish(conn, update, "cancelled", now, state, keep_versions)

        return self._write(txn)

    def list_expired(self, now: float) -> Deferred[list[UpdateRecord]]:
        def txn(conn: sqlite3.Connection) -> list[UpdateRecord]:
            rows = conn.execute(
                f"SELECT {_UPDATE_COLUMNS} FROM updates "
                "WHERE status = 'running' AND lease_expires <= ?",
                (now,),
            ).fetchall()
            return [_update(row) for row in rows]

        return self._read(txn)

    def expire_update(
        self, update_id: str, now: float, state: StateBlob | None = None, keep_versions: int = 0
    ) -> Deferred[bool]:
        def txn(conn: sqlite3.Connection) -> bool:
            update = _find_update(conn, update_id)
            if update is None or update.status != "running" or (update.lease_expires or 0) > now:
                return False  # renewed, finished or taken over meanwhile
            _finish(conn, update, "failed", now, state, keep_versions)
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
        self, stack_id: int, page: int, page_size: int
    ) -> Deferred[list[UpdateRecord]]:
        def txn(conn: sqlite3.Connection) -> list[UpdateRecord]:
            rows = conn.execute(
                f"SELECT {_UPDATE_COLUMNS} FROM updates WHERE stack_id = ? AND dry_run = 0 "
                "AND status != 'not-started' ORDER BY version DESC, created DESC "
                "LIMIT ? OFFSET ?",
                (stack_id, page_size, (page - 1) * page_size),
            ).fetchall()
            return [_update(row) for row in rows]

        return self._read(txn)

    # -- events ---------------------------------------------------------------------------

    def append_events(
        self, batches: list[tuple[str, list[StoredEvent]]], summaries: dict[str, dict[str, int]]
    ) -> Deferred[None]:
        def txn(conn: sqlite3.Connection) -> None:
            for update_id, events in batches:
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


def _get_stack_by_id(conn: sqlite3.Connection, stack_id: int) -> StackRecord:
    row = conn.execute(f"SELECT {_STACK_COLUMNS} FROM stacks WHERE id = ?", (stack_id,)).fetchone()
    if row is None:
        raise NotFound("Not Found: stack not found")
    return _stack(row, _read_tags(conn, [stack_id]).get(stack_id, {}))


def _get_stack_by_ref(conn: sqlite3.Connection, ref: StackRef, aliases: bool) -> StackRecord | None:
    row = conn.execute(
        f"SELECT {_STACK_COLUMNS} FROM stacks WHERE org = ? AND project = ? AND name = ?",
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
    return _stack(row, _read_tags(conn, [row[0]]).get(row[0], {}))


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


def _find_update(conn: sqlite3.Connection, update_id: str) -> UpdateRecord | None:
    row = conn.execute(
        f"SELECT {_UPDATE_COLUMNS} FROM updates WHERE id = ?", (update_id,)
    ).fetchone()
    return _update(row) if row else None


def _insert_update(
    conn: sqlite3.Connection, update: UpdateRecord, *, status: str, version: int
) -> None:
    conn.execute(
        f"INSERT INTO updates ({_UPDATE_COLUMNS}) VALUES "
        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            update.id,
            update.stack_id,
            update.kind,
            int(update.dry_run),
            status,
            version,
            json.dumps(update.program),
            json.dumps(update.config),
            json.dumps(update.metadata),
            update.created,
            update.token,
            update.lease_expires,
            update.start_time,
            update.end_time,
            json.dumps(update.resource_changes) if update.resource_changes is not None else None,
            update.journal_version,
            update.requested_by,
            update.engine_version,
            update.checkpoint_seq,
        ),
    )


def _check_lease(conn: sqlite3.Connection, update_id: str, token: str, now: float) -> UpdateRecord:
    update = _find_update(conn, update_id)
    if update is None or not update.token or update.token != token:
        raise Forbidden("Forbidden: the update token is not valid for this update")
    if update.status != "running":
        raise Conflict(_not_running_message(update.status))
    if (update.lease_expires or 0) <= now:
        raise Forbidden("Forbidden: the update's lease has expired")
    return update


def _check_writable(
    conn: sqlite3.Connection, update_id: str, token: str, now: float
) -> UpdateRecord:
    update = _check_lease(conn, update_id, token, now)
    if update.dry_run:
        raise Forbidden(
            "Forbidden: Updating the checkpoint is not permitted for preview operations."
        )
    return update


def _not_running_message(status: str) -> str:
    return {
        "not-started": "Conflict: The Update has not started",
        "cancelled": "Conflict: The Update has been cancelled",
        "failed": "Conflict: The Update has already completed",
        "succeeded": "Conflict: The Update has already completed",
    }.get(status, "Conflict: The Update is not in progress.")


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
) -> None:
    conn.execute(
        "UPDATE updates SET status = ?, end_time = ? WHERE id = ?", (status, now, update.id)
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
