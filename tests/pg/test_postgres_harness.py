"""The PostgreSQL test harness itself (tests/postgres.py): a real server on 127.0.0.1 that
psycopg 3 reaches with password authentication, with working advisory locks, gone after stop.

Every wait is bounded: connect_timeout on connections, statement_timeout/lock_timeout on the
server, and timeouts on thread joins.
"""

from __future__ import annotations

import socket
import threading
import time

import psycopg
import pytest

from tests.postgres import (
    PostgresServer,
    listening_addresses,
    require_bin_dir,
)

LOCK_KEY = 1_400_014
WAIT = 10.0


def connect(server: PostgresServer) -> psycopg.Connection[tuple[object, ...]]:
    conn = psycopg.connect(server.dsn, autocommit=True)
    conn.execute("SET statement_timeout = '10s'")
    return conn


def test_crud_over_tcp_with_password(postgres_server: PostgresServer) -> None:
    with connect(postgres_server) as conn:
        conn.execute("DROP TABLE IF EXISTS harness_items")
        conn.execute("CREATE TABLE harness_items (id serial PRIMARY KEY, name text NOT NULL)")
        conn.execute(
            "INSERT INTO harness_items (name) VALUES (%s), (%s)", ("alpha", "beta"), prepare=False
        )
        rows = conn.execute("SELECT id, name FROM harness_items ORDER BY id").fetchall()
        assert rows == [(1, "alpha"), (2, "beta")]
        db, user = conn.execute("SELECT current_database(), current_user").fetchone() or ()
        assert (db, user) == (postgres_server.database, postgres_server.user)
        conn.execute("DROP TABLE harness_items")


def test_url_form_connects(postgres_server: PostgresServer) -> None:
    with psycopg.connect(postgres_server.url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_tcp_requires_the_password(postgres_server: PostgresServer) -> None:
    wrong = postgres_server.dsn.replace(postgres_server.password, "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong)


def test_advisory_lock_across_connections(postgres_server: PostgresServer) -> None:
    with connect(postgres_server) as holder, connect(postgres_server) as other:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        # Held elsewhere: try-lock fails at once, a blocking lock times out.
        assert other.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone() == (False,)
        other.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            other.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        other.execute("SET lock_timeout = 0")

        # A blocked waiter gets the lock as soon as the holder releases it.
        acquired = threading.Event()
        errors: list[BaseException] = []

        def wait_for_lock() -> None:
            try:
                other.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
                acquired.set()
            except BaseException as error:
                errors.append(error)

        waiter = threading.Thread(target=wait_for_lock, daemon=True)
        waiter.start()
        time.sleep(0.3)
        assert not acquired.is_set(), "the waiter got a lock that is still held"
        assert holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,)).fetchone() == (True,)
        waiter.join(WAIT)
        assert not waiter.is_alive(), f"waiter still blocked after {WAIT}s"
        assert errors == []
        assert acquired.is_set()

        # Now the holder is the one locked out; the lock dies with the session.
        assert holder.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone() == (False,)
        other.close()
        # The server ends the closed session's backend asynchronously: poll for the release.
        deadline = time.monotonic() + WAIT
        while holder.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone() != (True,):
            assert time.monotonic() < deadline, f"lock still held {WAIT}s after its session closed"
            time.sleep(0.05)
        holder.execute("SELECT pg_advisory_unlock_all()")


def test_listens_on_loopback_only(postgres_server: PostgresServer) -> None:
    with connect(postgres_server) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        row = conn.execute("SELECT inet_server_addr()::text, inet_server_port()").fetchone()
        assert row == ("127.0.0.1/32", postgres_server.port)
    sockets = listening_addresses(postgres_server.port)
    # 0100007F is 127.0.0.1 in /proc/net/tcp's little-endian hex.
    assert sockets == [("tcp", "0100007F")], sockets


def test_stop_removes_everything() -> None:
    server = PostgresServer(require_bin_dir(), database="scratch")
    server.start()
    try:
        root, port, pid = server.root, server.port, server.postmaster_pid()
        assert root is not None and root.is_dir()
        assert pid is not None
        assert (server.socket_dir / f".s.PGSQL.{port}").exists()
        with psycopg.connect(server.dsn) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("scratch",)
    finally:
        server.stop()
    assert server.root is None
    assert not root.exists(), f"{root} left behind"
    assert _process_gone(pid, WAIT), f"postmaster {pid} still running"
    assert listening_addresses(port) == []
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=WAIT):
        pass
    server.stop()  # idempotent


def _process_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False
