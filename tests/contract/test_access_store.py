"""The contract of identities, access tokens and the audit trail, kept by every `Store`
implementation (the parametrized `store` fixture of test_store.py), and the migrations that
add their tables to existing SQLite and PostgreSQL databases."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg

from pulumid.errors import Conflict
from pulumid.storage import pg_schema, schema
from pulumid.storage.interface import Store
from pulumid.storage.postgres import PostgresStore
from pulumid.storage.records import (
    AuditRecord,
    IdentityRecord,
    RetentionRules,
    StackRef,
    TokenRecord,
)
from pulumid.storage.sqlite import SQLiteStore
from pulumid.threads import InlineRunner
from tests.contract.test_store import NOW, fails, ok, opener, store
from tests.postgres import PostgresServer

__all__ = ["opener", "store"]  # the fixtures, for pytest

NO_RULES = {
    "events": 0,
    "previews": 0,
    "updates": 0,
    "unstarted": 0,
    "claims": 0,
    "tokens": 0,
    "audit": 0,
}


def identity(login: str = "alice", **changes: Any) -> IdentityRecord:
    record = IdentityRecord(
        login=login,
        name=login.title(),
        email=f"{login}@example.com",
        groups=("dev", "ops"),
        provider="oidc",
        created=NOW,
        checked=NOW + 0.25,
        refresh_token=b"\x00sealed-refresh-token",
    )
    return replace(record, **changes)


def token(token_id: str, login: str = "alice", **changes: Any) -> TokenRecord:
    record = TokenRecord(
        id=token_id,
        token_hash="hash-" + token_id,
        login=login,
        kind="personal",
        description=f"token {token_id}",
        created=NOW,
    )
    return replace(record, **changes)


def event(action: str = "stack.create", **changes: Any) -> AuditRecord:
    record = AuditRecord(
        time=NOW,
        org="acme",
        actor="alice",
        action=action,
        resource="acme/web/dev",
        status=200,
        client_ip="192.0.2.7",
    )
    return replace(record, **changes)


def audit(
    store: Store,
    org: str = "acme",
    *,
    start: float | None = None,
    end: float | None = None,
    actor: str | None = None,
    action: str | None = None,
    before: int = 0,
    limit: int = 100,
) -> list[AuditRecord]:
    return ok(store.list_audit_events(org, start, end, actor, action, before, limit))


def descriptions(events: list[AuditRecord]) -> list[str]:
    return [e.description for e in events]


def ids(tokens: list[TokenRecord]) -> list[str]:
    return [t.id for t in tokens]


# -- identities ---------------------------------------------------------------------------


def test_identity_round_trip(store: Store) -> None:
    assert ok(store.get_identity("alice")) is None
    alice = identity(groups=("dev", "ünïcode group", "a,b"), disabled=False)
    ok(store.put_identity(alice))
    got = ok(store.get_identity("alice"))
    assert got == alice
    assert got is not None
    assert isinstance(got.groups, tuple) and got.disabled is False
    assert isinstance(got.refresh_token, bytes)
    assert ok(store.get_identity("Alice")) is None  # logins are exact


def test_put_identity_replaces_every_field(store: Store) -> None:
    ok(store.put_identity(identity()))
    ok(store.put_identity(identity("bob")))
    again = IdentityRecord(
        login="alice",
        name="Alice Liddell",
        email="alice@wonderland.example",
        groups=(),
        provider="google",
        created=NOW + 5,
        checked=NOW + 9.5,
        refresh_token=None,
        disabled=True,
    )
    ok(store.put_identity(again))
    got = ok(store.get_identity("alice"))
    assert got == again
    assert got is not None and got.disabled is True and got.groups == ()
    assert ok(store.get_identity("bob")) == identity("bob")


def test_list_identities_is_ordered_by_login(store: Store) -> None:
    assert ok(store.list_identities()) == []
    for login in ("carol", "alice", "bob"):
        ok(store.put_identity(identity(login)))
    listed = ok(store.list_identities())
    assert [i.login for i in listed] == ["alice", "bob", "carol"]
    assert listed[0] == identity("alice")


# -- access tokens ------------------------------------------------------------------------


def test_token_round_trip(store: Store) -> None:
    exchanged = token(
        "t1", kind="exchange", expires=NOW + 3600.5, last_used=NOW + 1, org="acme", role="admin"
    )
    ok(store.create_token(exchanged))
    assert ok(store.find_token("hash-t1")) == exchanged
    assert ok(store.find_token("hash-nope")) is None
    ok(store.create_token(token("t2")))
    plain = ok(store.find_token("hash-t2"))
    assert plain == token("t2")
    assert plain is not None and (plain.expires, plain.last_used, plain.org) == (0.0, 0.0, "")


def test_a_taken_token_id_or_hash_conflicts(store: Store) -> None:
    ok(store.create_token(token("t1")))
    fails(store.create_token(token("t1", token_hash="other-hash")), Conflict)
    fails(store.create_token(token("t2", token_hash="hash-t1", login="mallory")), Conflict)
    assert ok(store.list_tokens(None)) == [token("t1")]
    # The store is usable after the refused insert.
    ok(store.create_token(token("t2")))
    assert ids(ok(store.list_tokens(None))) == ["t1", "t2"]


def test_list_tokens_newest_first_of_one_login_or_all(store: Store) -> None:
    ok(store.create_token(token("old", created=NOW - 100)))
    ok(store.create_token(token("new", created=NOW + 100)))
    ok(store.create_token(token("b-tie", created=NOW)))
    ok(store.create_token(token("a-tie", created=NOW)))
    ok(store.create_token(token("bobs", login="bob", created=NOW + 50)))
    # Newest first; tokens made at the same time by id.
    assert ids(ok(store.list_tokens(None))) == ["new", "bobs", "a-tie", "b-tie", "old"]
    assert ids(ok(store.list_tokens("alice"))) == ["new", "a-tie", "b-tie", "old"]
    assert ok(store.list_tokens("bob")) == [token("bobs", login="bob", created=NOW + 50)]
    assert ok(store.list_tokens("nobody")) == []


def test_delete_token_only_of_its_login(store: Store) -> None:
    ok(store.create_token(token("a1")))
    ok(store.create_token(token("b1", login="bob")))
    # Not bob's token: nothing is deleted.
    assert ok(store.delete_token("a1", "bob")) is False
    assert ok(store.find_token("hash-a1")) == token("a1")
    assert ok(store.delete_token("a1", "alice")) is True
    assert ok(store.find_token("hash-a1")) is None
    assert ok(store.delete_token("a1", "alice")) is False
    assert ok(store.delete_token("nope", None)) is False
    # Without a login, anyone's.
    assert ok(store.delete_token("b1", None)) is True
    assert ok(store.list_tokens(None)) == []


def test_delete_tokens_of_a_login(store: Store) -> None:
    for n in range(3):
        ok(store.create_token(token(f"a{n}")))
    ok(store.create_token(token("b1", login="bob")))
    assert ok(store.delete_tokens_of("alice")) == 3
    assert ok(store.delete_tokens_of("alice")) == 0
    assert ok(store.delete_tokens_of("nobody")) == 0
    assert ids(ok(store.list_tokens(None))) == ["b1"]


def test_touch_tokens_raises_last_used_and_never_lowers_it(store: Store) -> None:
    ok(store.create_token(token("t1")))
    ok(store.create_token(token("t2", last_used=NOW + 50)))
    ok(store.create_token(token("t3", last_used=NOW + 7)))
    ok(store.touch_tokens({"t1": NOW + 10, "t2": NOW + 20, "unknown": NOW + 30}))
    ok(store.touch_tokens({}))

    def last_used(token_id: str) -> float:
        found = ok(store.find_token("hash-" + token_id))
        assert found is not None
        return found.last_used

    assert (last_used("t1"), last_used("t2"), last_used("t3")) == (NOW + 10, NOW + 50, NOW + 7)
    ok(store.touch_tokens({"t1": NOW + 5, "t3": NOW + 7.5}))
    assert (last_used("t1"), last_used("t3")) == (NOW + 10, NOW + 7.5)
    # Only last_used changes.
    assert ok(store.find_token("hash-t1")) == token("t1", last_used=NOW + 10)
    assert ok(store.find_token("hash-unknown")) is None


# -- audit trail --------------------------------------------------------------------------


def test_audit_events_get_ids_and_list_newest_first(store: Store) -> None:
    assert audit(store) == []
    ok(store.add_audit_events([]))
    first = [
        event(description="one"),
        event(description="two", auth_failure=True, status=401, actor=""),
        event(description="three", time=NOW - 5),  # listed by id, not by time
    ]
    ok(store.add_audit_events(first))
    ok(store.add_audit_events([event(description="four", client_ip="2001:db8::1")]))
    listed = audit(store)
    assert descriptions(listed) == ["four", "three", "two", "one"]
    got_ids = [e.id for e in listed]
    assert all(i > 0 for i in got_ids) and got_ids == sorted(got_ids, reverse=True)
    assert len(set(got_ids)) == 4
    assert [replace(e, id=0) for e in listed[1:]] == first[::-1]
    assert listed[2].auth_failure is True and listed[1].auth_failure is False
    assert listed[0].client_ip == "2001:db8::1"


def test_audit_paging_before_an_id(store: Store) -> None:
    ok(store.add_audit_events([event(description=str(n)) for n in range(7)]))
    pages: list[list[str]] = []
    before = 0
    while page := audit(store, before=before, limit=3):
        pages.append(descriptions(page))
        before = page[-1].id
    assert pages == [["6", "5", "4"], ["3", "2", "1"], ["0"]]
    newest = audit(store, limit=1)[0]
    assert descriptions(audit(store, before=newest.id + 1, limit=1)) == ["6"]


def test_audit_filters(store: Store) -> None:
    ok(
        store.add_audit_events(
            [
                event(description="early", time=NOW - 10),
                event(description="start", time=NOW),
                event(description="bob", time=NOW + 5, actor="bob"),
                event(description="delete", time=NOW + 5, action="stack.delete"),
                event(description="end", time=NOW + 10),
                event(description="late", time=NOW + 11),
                event(description="elsewhere", org="other", time=NOW + 5),
            ]
        )
    )
    everything = ["late", "end", "delete", "bob", "start", "early"]
    assert descriptions(audit(store)) == everything
    assert descriptions(audit(store, "other")) == ["elsewhere"]
    assert audit(store, "nobody") == []
    # start and end are inclusive.
    assert descriptions(audit(store, start=NOW, end=NOW + 10)) == ["end", "delete", "bob", "start"]
    assert descriptions(audit(store, start=NOW + 10.5)) == ["late"]
    assert descriptions(audit(store, end=NOW - 0.5)) == ["early"]
    # actor and action match exactly.
    assert descriptions(audit(store, actor="bob")) == ["bob"]
    assert audit(store, actor="bo") == []
    assert descriptions(audit(store, action="stack.delete")) == ["delete"]
    assert audit(store, action="stack") == []
    # Together, and paged.
    create = audit(store, actor="alice", action="stack.create", start=NOW, end=NOW + 11)
    assert descriptions(create) == ["late", "end", "start"]
    page = audit(store, actor="alice", action="stack.create", start=NOW, before=create[0].id)
    assert descriptions(page) == ["end", "start"]


# -- retention ----------------------------------------------------------------------------


def test_retention_deletes_expired_tokens_and_old_audit_events(store: Store) -> None:
    for name, expires in (
        ("never", 0.0),
        ("long-expired", NOW - 100),
        ("just-expired", NOW - 0.5),
        ("at-cutoff", NOW),
        ("live", NOW + 100),
    ):
        ok(store.create_token(token(name, expires=expires)))
    times = (NOW - 10, NOW - 0.5, NOW, NOW + 1)
    ok(store.add_audit_events([event(description=str(t), time=t) for t in times]))
    # Without their rules, both are kept.
    assert ok(store.prune(RetentionRules(events_before=NOW + 10))) == NO_RULES
    counts = ok(store.prune(RetentionRules(tokens_expired_before=NOW, audit_before=NOW)))
    assert counts == {**NO_RULES, "tokens": 2, "audit": 2}
    assert sorted(ids(ok(store.list_tokens(None)))) == ["at-cutoff", "live", "never"]
    assert descriptions(audit(store)) == [str(NOW + 1), str(NOW)]
    assert ok(store.prune(RetentionRules(tokens_expired_before=NOW, audit_before=NOW))) == NO_RULES


def test_audit_ids_are_never_handed_out_again(store: Store) -> None:
    ok(store.add_audit_events([event(description="a"), event(description="b")]))
    newest = audit(store)[0].id
    assert ok(store.prune(RetentionRules(audit_before=NOW + 1)))["audit"] == 2
    ok(store.add_audit_events([event(description="c")]))
    [again] = audit(store)
    assert again.id > newest


def test_reopen_keeps_identities_tokens_and_audit_events(
    opener: Callable[[Path], Store], tmp_path: Path
) -> None:
    first = opener(tmp_path)
    try:
        ok(first.put_identity(identity()))
        ok(first.create_token(token("t1", expires=NOW + 60)))
        ok(first.add_audit_events([event()]))
    finally:
        first.close()
    again = opener(tmp_path)
    try:
        assert ok(again.list_identities()) == [identity()]
        assert ok(again.list_tokens("alice")) == [token("t1", expires=NOW + 60)]
        assert [replace(e, id=0) for e in audit(again)] == [event()]
    finally:
        again.close()


# -- migrations ---------------------------------------------------------------------------


def _use_the_new_tables(store: Store) -> None:
    ok(store.put_identity(identity()))
    ok(store.create_token(token("t1")))
    ok(store.add_audit_events([event()]))
    assert ok(store.get_identity("alice")) == identity()
    assert ok(store.find_token("hash-t1")) == token("t1")
    assert [replace(e, id=0) for e in audit(store)] == [event()]


def test_sqlite_v4_migrates_to_v5_keeping_its_data(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
    for step in schema.MIGRATIONS[:4]:
        if callable(step):
            step(conn)
        else:
            conn.executescript(step)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '4')")
    conn.execute("INSERT INTO stacks (org, project, name, created) VALUES ('o', 'p', 's', 0)")
    conn.execute("INSERT INTO stack_tags VALUES (1, 'team', 'x')")
    conn.execute("INSERT INTO claims VALUES ('retention', 'node-a', 1.5)")
    conn.close()
    store = SQLiteStore.open(path, InlineRunner())
    try:
        stack = ok(store.get_stack(StackRef("o", "p", "s")))
        assert stack is not None and stack.id == 1 and stack.tags == {"team": "x"}
        assert ok(store.claim("retention", "node-b", 1.0, 2.0)) is False
        _use_the_new_tables(store)
    finally:
        store.close()
    with closing(sqlite3.connect(path)) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == (str(schema.SCHEMA_VERSION),) and schema.SCHEMA_VERSION >= 5
    assert (tmp_path / f"db.sqlite.before-v{schema.SCHEMA_VERSION}").exists()


def test_postgres_v2_migrates_to_v3_keeping_its_data(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database("migrate")
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL)")
        for step in pg_schema.MIGRATIONS[:2]:
            assert isinstance(step, str)
            conn.execute(step)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '2'::bytea)")
        conn.execute("INSERT INTO stacks (org, project, name, created) VALUES ('o', 'p', 's', 0)")
        conn.execute("INSERT INTO claims VALUES ('retention', 'node-a', 1.5)")
    store = PostgresStore.open(url, InlineRunner())
    try:
        stack = ok(store.get_stack(StackRef("o", "p", "s")))
        assert stack is not None and stack.id == 1
        assert ok(store.claim("retention", "node-b", 1.0, 2.0)) is False
        _use_the_new_tables(store)
        assert ok(store.get_meta("schema_version")) == str(pg_schema.SCHEMA_VERSION).encode()
        assert pg_schema.SCHEMA_VERSION >= 3
        # A new stack still gets the next id.
        assert ok(store.create_stack(StackRef("o", "p", "t"), {}, NOW, None)).id == 2
    finally:
        store.close()
        postgres_server.drop_database(url)
