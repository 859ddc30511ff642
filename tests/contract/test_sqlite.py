"""What only the SQLite store has to get right: files, the lock, WAL, migrations (issue 13,
classes 8 and 9)."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from pulumid.auth.tokens import hash_token
from pulumid.errors import Conflict, Unavailable
from pulumid.storage import sqlite as sqlite_module
from pulumid.storage.faults import Faults
from pulumid.storage.records import StackRef, StateBlob
from pulumid.storage.schema import MIGRATIONS, SCHEMA_VERSION
from pulumid.storage.sqlite import SQLiteStore, StorageUnusable, connect
from pulumid.threads import InlineRunner
from tests.contract.test_store import NOW, fails, ok


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_data_file_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = SQLiteStore.open(tmp_path / "db.sqlite", InlineRunner())
        ok(store.create_stack(StackRef("o", "p", "s"), {}, NOW, None))
        files = [tmp_path / n for n in ("db.sqlite", "db.sqlite-wal", "db.sqlite-shm")]
        files.append(tmp_path / "db.sqlite.lock")
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
        store.close()
        # A database made world-readable by hand is made private again at the next start.
        os.chmod(files[0], 0o644)  # closing removed the WAL and SHM files
        store = SQLiteStore.open(tmp_path / "db.sqlite", InlineRunner())
        assert {f.name: mode(f) for f in files[:3] if f.exists()} == {
            f.name: 0o600 for f in files[:3] if f.exists()
        }
        store.close()
    finally:
        os.umask(old)


def test_a_second_daemon_on_the_same_file_is_refused(tmp_path: Path) -> None:
    first = SQLiteStore.open(tmp_path / "db.sqlite", InlineRunner())
    with pytest.raises(StorageUnusable, match=f"in use by another pulumid \\(pid {os.getpid()}"):
        SQLiteStore.open(tmp_path / "db.sqlite", InlineRunner())
    first.close()
    SQLiteStore.open(tmp_path / "db.sqlite", InlineRunner()).close()  # free once closed


def test_a_database_that_cannot_use_wal_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sqlite3.connect

    class NoWal:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str, *args: Any) -> Any:
            if sql == "PRAGMA journal_mode=WAL":
                return self.conn.execute("SELECT 'delete'")
            return self.conn.execute(sql, *args)

        def close(self) -> None:
            self.conn.close()

    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: NoWal(real(*a, **k)))
    with pytest.raises(StorageUnusable, match="WAL"):
        connect(tmp_path / "db.sqlite", sync_commits=True)


def test_sync_commits_sets_synchronous_full(tmp_path: Path) -> None:
    for sync, expected in ((True, 2), (False, 1)):
        conn = connect(tmp_path / f"{sync}.sqlite", sync_commits=sync)
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == expected
        conn.close()


def test_migration_to_v3_hashes_the_stored_update_tokens(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
    for script in MIGRATIONS[:2]:
        assert isinstance(script, str)
        conn.executescript(script)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    conn.execute("INSERT INTO stacks (org, project, name, created) VALUES ('o', 'p', 's', 0)")
    update_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO updates (id, stack_id, kind, dry_run, status, version, program, config, "
        "metadata, created, token, lease_expires) VALUES "
        "(?, 1, 'update', 0, 'running', 1, '{}', '{}', '{}', 0, 'plain-token', ?)",
        (update_id, NOW + 300),
    )
    conn.close()
    os.chmod(path, 0o644)
    store = SQLiteStore.open(path, InlineRunner())
    update = ok(store.get_update(update_id))
    assert update is not None and update.token_hash == hash_token("plain-token")
    assert ok(store.check_lease(update_id, hash_token("plain-token"), NOW)).id == update_id
    store.close()
    assert b"plain-token" not in path.read_bytes()
    copy = tmp_path / f"db.sqlite.before-v{SCHEMA_VERSION}"
    assert copy.exists() and mode(copy) == 0o600


def test_a_large_commit_truncates_the_wal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_module, "WAL_TRUNCATE_BYTES", 256 * 1024)
    store = SQLiteStore.open(tmp_path / "db.sqlite", InlineRunner())
    stack = ok(store.create_stack(StackRef("o", "p", "s"), {}, NOW, None))
    ok(store.create_stack(StackRef("o", "p", "t"), {}, NOW, StateBlob(os.urandom(1 << 20), 0)))
    wal = tmp_path / "db.sqlite-wal"
    assert wal.stat().st_size < 256 * 1024
    assert stack.id == 1
    store.close()


def test_faults_are_parsed_and_fire_once() -> None:
    faults = Faults.parse("ioerror@commit:2, kill@committed:9")
    faults.hit("commit")
    with pytest.raises(sqlite3.OperationalError):
        faults.hit("commit")
    faults.hit("commit")  # once only
    for bad in ("boom@commit:1", "kill@nowhere:1", "kill@commit"):
        with pytest.raises(ValueError):
            Faults.parse(bad)


def test_storage_errors_are_unavailable_and_the_store_recovers(tmp_path: Path) -> None:
    store = SQLiteStore.open(tmp_path / "db.sqlite", InlineRunner())
    store.faults.arm("ioerror", "commit")
    fails(store.create_stack(StackRef("o", "p", "s"), {}, NOW, None), Unavailable)
    assert ok(store.get_stack(StackRef("o", "p", "s"))) is None
    ok(store.create_stack(StackRef("o", "p", "s"), {}, NOW, None))
    store.close()


def test_a_refused_create_does_not_use_up_a_stack_id(tmp_path: Path) -> None:
    store = SQLiteStore.open(tmp_path / "db.sqlite", InlineRunner())
    assert ok(store.create_stack(StackRef("o", "p", "s"), {}, NOW, None)).id == 1
    fails(store.create_stack(StackRef("o", "p", "s"), {}, NOW, None), Conflict)
    assert ok(store.create_stack(StackRef("o", "p", "t"), {}, NOW, None)).id == 2
    store.close()


def test_closing_waits_for_a_call_running_on_a_worker_thread(tmp_path: Path) -> None:
    # The daemon (and tests) may close the store while a batched write (the audit trail)
    # still runs on a worker thread: closing under it crashed the process with a segfault.
    store = SQLiteStore.open(tmp_path / "db.sqlite", InlineRunner())
    inside, release = threading.Event(), threading.Event()
    outcome: list[object] = []

    def slow(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('k', x'00')")
        inside.set()
        release.wait(5)

    def worker() -> None:
        try:
            outcome.append(store._in_transaction(slow))
        except BaseException as e:  # pragma: no cover - shown by the assertion below
            outcome.append(e)

    thread = threading.Thread(target=worker)
    thread.start()
    assert inside.wait(5)
    closer = threading.Thread(target=store.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive(), "close() did not wait for the running transaction"
    release.set()
    closer.join(5)
    thread.join(5)
    assert outcome == [None]
    with pytest.raises(Unavailable):
        store._in_transaction(slow)
    reopened = SQLiteStore.open(tmp_path / "db.sqlite", InlineRunner())
    assert ok(reopened.get_meta("k")) == b"\x00"
    reopened.close()
