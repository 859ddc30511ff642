"""The contract every `Store` implementation keeps, run against each implementation.

Adding an implementation (PostgreSQL + S3 later) is one entry in IMPLEMENTATIONS: a function
that opens a store on a directory. Opening the same directory twice must reach the same data.
The stores here run their work inline, so every Deferred has fired when the call returns.
"""

from __future__ import annotations

import gzip
import hashlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from pulumid.errors import BadRequest, Conflict, Forbidden, NotFound, PulumidError
from pulumid.storage.blobs import S3Blobs
from pulumid.storage.interface import Store
from pulumid.storage.postgres import PostgresStore
from pulumid.storage.records import (
    RetentionRules,
    StackRecord,
    StackRef,
    StateBlob,
    StoredEvent,
    UpdateRecord,
    WrappedKey,
)
from pulumid.storage.split import BlobbedStore
from pulumid.storage.sqlite import SQLiteStore
from pulumid.threads import InlineRunner
from tests.minio import s3_url
from tests.postgres import PostgresServer

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

ANOTHER_UPDATE = "Conflict: Another update is currently in progress."
STACK_HAS_RESOURCES = "Bad Request: Stack still contains resources."
NOW = 1_700_000_000.0
TTL = 300.0


def _open_sqlite(directory: Path) -> Store:
    return SQLiteStore.open(directory / "db.sqlite", InlineRunner())


class _Postgres:
    """The session server, set by the `opener` fixture before a PostgreSQL test opens a store."""

    server: PostgresServer | None = None


def _open_postgres(directory: Path) -> Store:
    """A store on the database of `directory`: named from its path, created if absent."""
    server = _Postgres.server
    assert server is not None, "the opener fixture starts the PostgreSQL server"
    database = "contract_" + hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:32]
    with psycopg.connect(server.dsn, autocommit=True) as admin:
        exists = admin.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if exists is None:
            admin.execute(f'CREATE DATABASE "{database}"')
    return PostgresStore.open(make_conninfo(server.dsn, dbname=database), InlineRunner())


class _MinIO:
    """The session MinIO endpoint, set by the `opener` fixture before an S3 test opens a store."""

    endpoint: str | None = None


def _with_s3(open_meta: Callable[[Path], Store]) -> Callable[[Path], Store]:
    """OPEN_META's store with its blobs in MinIO, under a prefix named from the directory."""

    def open_split(directory: Path) -> Store:
        endpoint = _MinIO.endpoint
        assert endpoint is not None, "the opener fixture starts MinIO"
        prefix = "contract-" + hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:32]
        blobs = S3Blobs.open(s3_url(endpoint, prefix), InlineRunner())
        return BlobbedStore(open_meta(directory), blobs)

    return open_split


# name -> opener(directory). One line per implementation.
IMPLEMENTATIONS: dict[str, Callable[[Path], Store]] = {
    "postgres": _open_postgres,
    "postgres+s3": _with_s3(_open_postgres),
    "sqlite": _open_sqlite,
    "sqlite+s3": _with_s3(_open_sqlite),
}

_sync = SynchronousTestCase()


def ok(d: Deferred[T]) -> T:
    return _sync.successResultOf(d)


def fails(d: Deferred[Any], kind: type[E]) -> E:
    error = _sync.failureResultOf(d, kind).value
    assert isinstance(error, kind)
    return error


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def opener(request: pytest.FixtureRequest) -> Callable[[Path], Store]:
    if request.param.startswith("postgres"):
        _Postgres.server = request.getfixturevalue("postgres_server")
    if request.param.endswith("+s3"):
        _MinIO.endpoint = request.getfixturevalue("minio_endpoint")
    return IMPLEMENTATIONS[request.param]


@pytest.fixture
def store(opener: Callable[[Path], Store], tmp_path: Path) -> Iterator[Store]:
    opened = opener(tmp_path)
    try:
        yield opened
    finally:
        opened.close()


def ref(name: str = "dev", project: str = "web", org: str = "acme") -> StackRef:
    return StackRef(org, project, name)


def blob(text: str, count: int = 0) -> StateBlob:
    return StateBlob(gzip.compress(text.encode()), count)


def state_text(store: Store, stack_id: int, version: int | None) -> str | None:
    state = ok(store.get_state(stack_id, version))
    return None if state is None else gzip.decompress(state.gzipped).decode()


def new_update(
    stack_id: int, *, dry_run: bool = False, kind: str = "update", created: float = NOW
) -> UpdateRecord:
    return UpdateRecord(
        id=str(uuid.uuid4()),
        stack_id=stack_id,
        kind=kind,
        dry_run=dry_run,
        status="not-started",
        version=0,
        program={"name": "web"},
        config={"web:size": {"string": "3", "secret": False, "object": False}},
        metadata={"message": "hi", "environment": {"exec.kind": "cli"}},
        created=created,
    )


def make_stack(store: Store, name: str = "dev", **kwargs: Any) -> StackRecord:
    tags: dict[str, str] = kwargs.pop("tags", {})
    initial: StateBlob | None = kwargs.pop("initial", None)
    return ok(store.create_stack(ref(name, **kwargs), tags, NOW, initial))


def started(
    store: Store, stack: StackRecord, *, now: float = NOW, dry_run: bool = False, token: str = "t"
) -> UpdateRecord:
    update = new_update(stack.id, dry_run=dry_run, created=now)
    ok(store.create_update(update))
    return ok(store.start_update(update.id, token, now, now + TTL, None, 0))


def stack_of(store: Store, stack: StackRecord) -> StackRecord:
    record = ok(store.get_stack(stack.ref))
    assert record is not None
    return record


# -- meta and keys ------------------------------------------------------------------------


def test_meta_put_if_absent(store: Store) -> None:
    assert ok(store.get_meta("k")) is None
    assert ok(store.set_meta_if_absent("k", b"first")) == b"first"
    assert ok(store.set_meta_if_absent("k", b"second")) == b"first"
    assert ok(store.get_meta("k")) == b"first"
    assert ok(store.schema_version()) == getattr(store, "expected_schema", 0) > 0
    ok(store.put_meta("k", b"replaced"))
    ok(store.put_meta("new", b"\x00binary"))
    assert ok(store.get_meta("k")) == b"replaced"
    assert ok(store.get_meta("new")) == b"\x00binary"


def test_stack_keys_put_if_absent(store: Store) -> None:
    stack = make_stack(store)
    other = make_stack(store, "other")
    first = WrappedKey("local:a", b"\x00wrapped-1")
    assert ok(store.get_stack_key(stack.id)) is None
    assert ok(store.put_stack_key_if_absent(stack.id, first)) == first
    assert ok(store.put_stack_key_if_absent(stack.id, WrappedKey("local:b", b"w-2"))) == first
    assert ok(store.get_stack_key(stack.id)) == first
    assert ok(store.get_stack_key(other.id)) is None


def test_stack_keys_rewrap_only_what_the_old_key_still_wraps(store: Store) -> None:
    stacks = [make_stack(store, f"s{i}") for i in range(5)]
    for i, stack in enumerate(stacks):
        key_id = "old" if i < 4 else "new"
        ok(store.put_stack_key_if_absent(stack.id, WrappedKey(key_id, b"k%d" % i)))
    assert ok(store.count_stack_keys()) == {"old": 4, "new": 1}
    # In stack id order, after a cursor, a page at a time.
    page = ok(store.stack_keys_not_wrapped_by("new", 0, 3))
    assert [sid for sid, _ in page] == [s.id for s in stacks[:3]]
    assert all(key.key_id == "old" for _, key in page)
    rest = ok(store.stack_keys_not_wrapped_by("new", page[-1][0], 3))
    assert [sid for sid, _ in rest] == [stacks[3].id]
    # A row another node re-wrapped first (its old key id no longer matches) is left alone.
    changes = [(sid, "old", WrappedKey("new", b"n" + key.wrapped)) for sid, key in page]
    changes.append((stacks[4].id, "old", WrappedKey("new", b"clobbered")))
    assert ok(store.rewrap_stack_keys(changes)) == 3
    assert ok(store.get_stack_key(stacks[0].id)) == WrappedKey("new", b"nk0")
    assert ok(store.get_stack_key(stacks[4].id)) == WrappedKey("new", b"k4")
    assert ok(store.count_stack_keys()) == {"old": 1, "new": 4}


# -- stacks -------------------------------------------------------------------------------


def test_create_and_get(store: Store) -> None:
    created = make_stack(store, tags={"owner": "alice"})
    assert created.ref == ref()
    assert created.tags == {"owner": "alice"}
    assert created.version == 0
    assert created.locked_by is None
    assert created.last_update is None
    assert created.created == int(NOW)
    assert ok(store.get_stack(ref())) == created
    assert ok(store.get_stack(ref("nope"))) is None
    assert ok(store.get_stack(ref(org="other"))) is None
    assert ok(store.get_state(created.id, None)) is None


def test_create_with_initial_state(store: Store) -> None:
    created = make_stack(store, initial=blob('{"version":3}', 2))
    assert created.version == 0
    assert created.resource_count == 2
    assert state_text(store, created.id, None) == '{"version":3}'


def test_duplicate_create_conflicts(store: Store) -> None:
    make_stack(store)
    error = fails(store.create_stack(ref(), {}, NOW, None), Conflict)
    assert error.status == 409
    assert "already exists" in error.message
    # Same name in another project or org is a different stack.
    make_stack(store, project="api")
    make_stack(store, org="acme2")


def test_project_exists(store: Store) -> None:
    make_stack(store)
    assert ok(store.project_exists("acme", "web")) is True
    assert ok(store.project_exists("acme", "api")) is False
    assert ok(store.project_exists("other", "web")) is False


def _names(stacks: list[StackRecord]) -> list[str]:
    return [str(s.ref) for s in stacks]


def test_list_filters(store: Store) -> None:
    make_stack(store, "a", tags={"env": "prod", "team": "x"})
    make_stack(store, "b", tags={"env": "dev"})
    make_stack(store, "c", project="api", tags={"team": "y"})
    make_stack(store, "d", org="elsewhere")
    everything = ok(store.list_stacks(["acme", "elsewhere"], None, None, None, None, 100))
    # (org, project, name) order: the order the CLI sorts them in.
    assert _names(everything) == ["acme/api/c", "acme/web/a", "acme/web/b", "elsewhere/web/d"]
    assert everything[1].tags == {"env": "prod", "team": "x"}
    acme = ok(store.list_stacks(["acme"], None, None, None, None, 100))
    assert _names(acme) == ["acme/api/c", "acme/web/a", "acme/web/b"]
    assert ok(store.list_stacks([], None, None, None, None, 100)) == []
    by_project = ok(store.list_stacks(["acme"], "api", None, None, None, 100))
    assert _names(by_project) == ["acme/api/c"]
    by_tag = ok(store.list_stacks(["acme"], None, "team", None, None, 100))
    assert _names(by_tag) == ["acme/api/c", "acme/web/a"]
    by_value = ok(store.list_stacks(["acme"], None, "env", "prod", None, 100))
    assert _names(by_value) == ["acme/web/a"]
    assert ok(store.list_stacks(["acme"], None, "env", "staging", None, 100)) == []
    combined = ok(store.list_stacks(["acme"], "web", "team", "x", None, 100))
    assert _names(combined) == ["acme/web/a"]


def test_list_paging(store: Store) -> None:
    # Created out of order, over two organizations and projects: pages come in (org,
    # project, name) order, each stack once, whatever the page size.
    refs = [("acme", "web", "s3"), ("other", "api", "s1"), ("acme", "api", "s9"),
            ("acme", "web", "s0"), ("other", "api", "s0"), ("acme", "web", "s1"),
            ("acme", "api", "s2")]  # fmt: skip
    for org, project, name in refs:
        make_stack(store, name, org=org, project=project)
    expected = ["/".join(r) for r in sorted(refs)]
    for size in (1, 3, 7, 8):
        seen: list[str] = []
        after: StackRef | None = None
        while True:
            page = ok(store.list_stacks(["other", "acme"], None, None, None, after, size))
            assert len(page) <= size
            seen.extend(_names(page))
            if len(page) < size:
                break
            after = page[-1].ref
        assert seen == expected
    # A bound between stacks, and past the last organization.
    tail = ok(
        store.list_stacks(["acme", "other"], None, None, None, StackRef("acme", "web", "s05"), 9)
    )
    assert _names(tail) == ["acme/web/s1", "acme/web/s3", "other/api/s0", "other/api/s1"]
    assert ok(store.list_stacks(["acme"], None, None, None, StackRef("zz", "a", "b"), 9)) == []


def test_stacks_by_id(store: Store) -> None:
    made = [make_stack(store, name) for name in ("s2", "s0", "s1")]
    made.append(make_stack(store, "s9", org="other"))
    first = ok(store.stacks_by_id(["acme", "other"], 0, 2))
    rest = ok(store.stacks_by_id(["acme", "other"], first[-1].id, 10))
    assert [s.id for s in first + rest] == [s.id for s in made]
    assert _names(ok(store.stacks_by_id(["other"], 0, 10))) == ["other/web/s9"]


def test_tags_replace(store: Store) -> None:
    stack = make_stack(store, tags={"a": "1", "b": "2"})
    ok(store.set_tags(stack.id, {"b": "3", "c": "4"}))
    assert stack_of(store, stack).tags == {"b": "3", "c": "4"}
    ok(store.set_tags(stack.id, {}))
    assert stack_of(store, stack).tags == {}
    fails(store.set_tags(stack.id + 1000, {"a": "1"}), NotFound)


def test_delete_refused_with_resources_unless_forced(store: Store) -> None:
    stack = make_stack(store, initial=blob("{}", 3))
    error = fails(store.delete_stack(stack.id, False), BadRequest)
    assert error.message == STACK_HAS_RESOURCES
    assert ok(store.get_stack(stack.ref)) is not None
    ok(store.delete_stack(stack.id, True))
    assert ok(store.get_stack(stack.ref)) is None
    assert ok(store.project_exists("acme", "web")) is False


def test_delete_empty_stack_removes_everything(store: Store) -> None:
    stack = make_stack(store)
    update = started(store, stack)
    ok(store.complete_update(update.id, "t", NOW + 1, "succeeded", 0))
    ok(store.put_stack_key_if_absent(stack.id, WrappedKey("k", b"key")))
    ok(store.delete_stack(stack.id, False))
    assert ok(store.get_stack(stack.ref)) is None
    assert ok(store.get_update(update.id)) is None
    # A new stack under the same name starts from scratch.
    again = make_stack(store)
    assert again.version == 0
    assert ok(store.get_stack_key(again.id)) is None


def test_delete_locked_stack_conflicts_unless_forced(store: Store) -> None:
    stack = make_stack(store)
    started(store, stack)
    assert fails(store.delete_stack(stack.id, False), Conflict).message == ANOTHER_UPDATE
    ok(store.delete_stack(stack.id, True))
    assert ok(store.get_stack(stack.ref)) is None


def test_rename_keeps_an_alias(store: Store) -> None:
    stack = make_stack(store, tags={"a": "1"})
    ok(store.put_stack_key_if_absent(stack.id, WrappedKey("k", b"key")))
    new = ref("prod", project="site")
    ok(store.rename_stack(stack.id, new, 0, None, None, 0))
    assert ok(store.get_stack(ref())) is None
    renamed = ok(store.get_stack(new))
    assert renamed is not None
    assert renamed.id == stack.id
    assert renamed.tags == {"a": "1"}
    via_alias = ok(store.get_stack_or_alias(ref()))
    assert via_alias is not None and via_alias.id == stack.id and via_alias.ref == new
    assert ok(store.get_stack_key(stack.id)) == WrappedKey("k", b"key")
    # A new stack at the old name takes the name back from the alias.
    fresh = make_stack(store)
    by_old = ok(store.get_stack_or_alias(ref()))
    assert by_old is not None and by_old.id == fresh.id


def test_rename_conflicts(store: Store) -> None:
    stack = make_stack(store)
    make_stack(store, "taken")
    assert (
        "already exists"
        in fails(store.rename_stack(stack.id, ref("taken"), 0, None, None, 0), Conflict).message
    )
    fails(store.rename_stack(stack.id, ref("other"), 5, None, None, 0), Conflict)
    update = started(store, stack)
    renaming = store.rename_stack(stack.id, ref("other"), update.version, None, None, 0)
    error = fails(renaming, Conflict)
    assert error.message == ANOTHER_UPDATE


def test_rename_with_state_is_a_new_version(store: Store) -> None:
    stack = make_stack(store, initial=blob("v0", 1))
    update = replace(new_update(stack.id, kind="rename"), start_time=NOW, end_time=NOW + 5)
    ok(store.rename_stack(stack.id, ref("prod"), 0, blob("renamed", 1), update, 0))
    renamed = ok(store.get_stack(ref("prod")))
    assert renamed is not None and renamed.version == 1
    assert state_text(store, stack.id, None) == "renamed"
    assert state_text(store, stack.id, 1) == "renamed"
    [entry] = ok(store.list_history(stack.id, 1, 10))
    assert (entry.id, entry.kind, entry.status, entry.version) == (
        update.id,
        "rename",
        "succeeded",
        1,
    )


# -- updates, leases, versions ------------------------------------------------------------


def test_start_real_update_locks_and_bumps_version(store: Store) -> None:
    stack = make_stack(store, initial=blob("base", 2))
    update = started(store, stack)
    assert update.status == "running"
    assert update.version == 1
    assert update.token_hash == "t"
    assert update.lease_expires == NOW + TTL
    assert update.start_time == NOW
    after = stack_of(store, stack)
    assert after.version == 1
    assert after.locked_by == update.id
    assert after.last_update == update.id
    # Version N starts as a copy of N-1.
    assert state_text(store, stack.id, 1) == "base"
    assert state_text(store, stack.id, None) == "base"
    assert state_text(store, stack.id, 0) == "base"


def test_start_errors(store: Store) -> None:
    stack = make_stack(store)
    fails(store.start_update("no-such-update", "t", NOW, NOW + TTL, None, 0), NotFound)
    update = started(store, stack)
    fails(store.start_update(update.id, "t2", NOW, NOW + TTL, None, 0), Conflict)
    fails(store.create_update(new_update(stack.id + 1000)), NotFound)


def test_start_applies_tags_and_journal_version(store: Store) -> None:
    stack = make_stack(store, tags={"old": "x"})
    update = new_update(stack.id)
    ok(store.create_update(update))
    running = ok(store.start_update(update.id, "t", NOW, NOW + TTL, {"pulumi:project": "web"}, 1))
    assert running.journal_version == 1
    assert stack_of(store, stack).tags == {"pulumi:project": "web"}


def test_dry_run_neither_locks_nor_bumps(store: Store) -> None:
    stack = make_stack(store, initial=blob("base", 1))
    preview = started(store, stack, dry_run=True)
    assert preview.version == 0
    after = stack_of(store, stack)
    assert (after.version, after.locked_by) == (0, None)
    # A real update may start beside it.
    real = started(store, stack, token="r")
    assert real.version == 1
    error = fails(store.save_checkpoint(preview.id, "t", NOW, blob("x")), Forbidden)
    assert "preview" in error.message
    ok(store.complete_update(preview.id, "t", NOW + 1, "succeeded", 0))
    assert stack_of(store, stack).locked_by == real.id
    assert ok(store.get_stack(stack.ref)) is not None
    assert [u.id for u in ok(store.list_history(stack.id, 1, 10, previews=False))] == [real.id]
    # Pulumi Cloud's history lists previews too; both have version 0 and 1 here.
    assert [u.id for u in ok(store.list_history(stack.id, 1, 10))] == [real.id, preview.id]


def test_checkpoint_overwrites_version_n(store: Store) -> None:
    stack = make_stack(store, initial=blob("base", 0))
    update = started(store, stack)
    ok(store.save_checkpoint(update.id, "t", NOW + 1, blob("first", 1)))
    ok(store.save_checkpoint(update.id, "t", NOW + 2, blob("second", 2)))
    assert state_text(store, stack.id, 1) == "second"
    assert state_text(store, stack.id, None) == "second"
    assert state_text(store, stack.id, 0) == "base"
    assert stack_of(store, stack).resource_count == 2


def test_pruning_keeps_the_newest_versions(store: Store) -> None:
    stack = make_stack(store)
    for i in range(1, 5):
        update = started(store, stack, now=NOW + i)
        ok(store.save_checkpoint(update.id, "t", NOW + i, blob(f"v{i}")))
        ok(store.complete_update(update.id, "t", NOW + i, "succeeded", 2))
    assert ok(store.get_state(stack.id, 1)) is None
    assert ok(store.get_state(stack.id, 2)) is None
    assert state_text(store, stack.id, 3) == "v3"
    assert state_text(store, stack.id, 4) == "v4"
    assert state_text(store, stack.id, None) == "v4"


def test_keep_versions_zero_keeps_all(store: Store) -> None:
    stack = make_stack(store)
    for i in range(1, 4):
        update = started(store, stack, now=NOW + i)
        ok(store.save_checkpoint(update.id, "t", NOW + i, blob(f"v{i}")))
        ok(store.complete_update(update.id, "t", NOW + i, "succeeded", 0))
    assert [state_text(store, stack.id, v) for v in (1, 2, 3)] == ["v1", "v2", "v3"]


def test_second_start_conflicts_while_the_lease_lives(store: Store) -> None:
    stack = make_stack(store)
    first = started(store, stack)
    second = new_update(stack.id)
    ok(store.create_update(second))
    error = fails(store.start_update(second.id, "t2", NOW + 10, NOW + 10 + TTL, None, 0), Conflict)
    assert error.message == ANOTHER_UPDATE
    assert error.status == 409
    assert ok(store.get_update(second.id)).status == "not-started"  # type: ignore[union-attr]
    assert stack_of(store, stack).locked_by == first.id


def test_takeover_after_expiry(store: Store) -> None:
    stack = make_stack(store)
    first = started(store, stack)
    second = new_update(stack.id)
    ok(store.create_update(second))
    later = NOW + TTL + 1
    running = ok(store.start_update(second.id, "t2", later, later + TTL, None, 0))
    assert running.version == 2
    old = ok(store.get_update(first.id))
    assert old is not None and old.status == "failed" and old.end_time == later
    assert stack_of(store, stack).locked_by == second.id


def test_renew_lease(store: Store) -> None:
    stack = make_stack(store)
    update = started(store, stack)
    ok(store.renew_lease(update.id, "t", NOW + 200, NOW + 500))
    assert ok(store.check_lease(update.id, "t", NOW + 400)).lease_expires == NOW + 500
    fails(store.renew_lease(update.id, "wrong", NOW + 200, NOW + 500), Forbidden)
    fails(store.renew_lease(update.id, "t", NOW + 600, NOW + 900), Forbidden)


def test_check_lease_rules(store: Store) -> None:
    stack = make_stack(store)
    update = started(store, stack)
    assert ok(store.check_lease(update.id, "t", NOW + 1)).id == update.id
    assert fails(store.check_lease(update.id, "wrong", NOW + 1), Forbidden).status == 403
    fails(store.check_lease("no-such-update", "t", NOW + 1), Forbidden)
    fails(store.check_lease(update.id, "t", NOW + TTL + 1), Forbidden)
    fails(store.save_checkpoint(update.id, "t", NOW + TTL + 1, blob("x")), Forbidden)
    ok(store.complete_update(update.id, "t", NOW + 2, "succeeded", 0))
    assert fails(store.check_lease(update.id, "t", NOW + 3), Conflict).status == 409
    fails(store.save_checkpoint(update.id, "t", NOW + 3, blob("x")), Conflict)


def test_not_started_update_has_no_lease(store: Store) -> None:
    stack = make_stack(store)
    update = new_update(stack.id)
    ok(store.create_update(update))
    fails(store.check_lease(update.id, "", NOW), Forbidden)


def test_complete(store: Store) -> None:
    stack = make_stack(store)
    update = started(store, stack)
    fails(store.complete_update(update.id, "wrong", NOW + 1, "succeeded", 0), Forbidden)
    ok(store.complete_update(update.id, "t", NOW + 1, "succeeded", 0))
    done = ok(store.get_update(update.id))
    assert done is not None and done.status == "succeeded" and done.end_time == NOW + 1
    after = stack_of(store, stack)
    assert after.locked_by is None
    assert after.last_update == update.id
    assert after.last_update_time == int(NOW + 1)
    # A retry of the same complete is fine; a different outcome is not.
    ok(store.complete_update(update.id, "t", NOW + 2, "succeeded", 0))
    fails(store.complete_update(update.id, "t", NOW + 2, "failed", 0), Conflict)
    assert ok(store.get_update(update.id)).end_time == NOW + 1  # type: ignore[union-attr]


def test_cancel(store: Store) -> None:
    stack = make_stack(store)
    update = started(store, stack)
    ok(store.cancel_update(update.id, NOW + 1))
    cancelled = ok(store.get_update(update.id))
    assert cancelled is not None and cancelled.status == "cancelled"
    assert stack_of(store, stack).locked_by is None
    fails(store.check_lease(update.id, "t", NOW + 2), Conflict)
    fails(store.cancel_update(update.id, NOW + 2), Conflict)
    fails(store.cancel_update("no-such-update", NOW + 2), NotFound)
    # The next update starts at once.
    assert started(store, stack, now=NOW + 3, token="n").status == "running"


def test_expire_leases(store: Store) -> None:
    one = make_stack(store, "one")
    two = make_stack(store, "two")
    old = started(store, one)
    fresh = started(store, two, now=NOW + 200)
    assert ok(store.list_expired(NOW + 100)) == []
    assert [u.id for u in ok(store.list_expired(NOW + TTL + 1))] == [old.id]
    assert ok(store.count_running(NOW + 100)) == (2, 2)
    assert ok(store.count_running(NOW + TTL + 1)) == (2, 1)  # one lease ran out
    # Not yet expired: expire_update leaves it alone.
    assert ok(store.expire_update(fresh.id, NOW + TTL + 1)) is False
    assert ok(store.expire_update(old.id, NOW + TTL + 1, blob("kept", 3))) is True
    expired = ok(store.get_update(old.id))
    assert expired is not None and expired.status == "failed"
    assert stack_of(store, one).locked_by is None
    assert stack_of(store, one).resource_count == 3
    assert stack_of(store, two).locked_by == fresh.id
    assert ok(store.list_expired(NOW + TTL + 2)) == []
    assert ok(store.count_running(NOW + TTL + 2)) == (1, 1)
    # A second expiry of the same update is a no-op.
    assert ok(store.expire_update(old.id, NOW + TTL + 3)) is False


def test_import_state(store: Store) -> None:
    stack = make_stack(store)
    update = replace(new_update(stack.id, kind="import"), end_time=NOW)
    version = ok(store.import_state(update, blob("imported", 4), 0))
    assert version == 1
    after = stack_of(store, stack)
    assert (after.version, after.resource_count, after.last_update) == (1, 4, update.id)
    assert state_text(store, stack.id, None) == "imported"
    [entry] = ok(store.list_history(stack.id, 1, 10))
    assert (entry.id, entry.kind, entry.status, entry.version) == (
        update.id,
        "import",
        "succeeded",
        1,
    )
    second = replace(new_update(stack.id, kind="import"), end_time=NOW)
    assert ok(store.import_state(second, blob("again"), 0)) == 2


def test_import_conflicts_with_a_running_update(store: Store) -> None:
    stack = make_stack(store)
    started(store, stack)
    update = new_update(stack.id, kind="import", created=NOW + 1)
    assert fails(store.import_state(update, blob("x"), 0), Conflict).message == ANOTHER_UPDATE
    late = new_update(stack.id, kind="import", created=NOW + TTL + 1)
    assert ok(store.import_state(late, blob("x"), 0)) == 2


def test_history_newest_first_with_and_without_dry_runs(store: Store) -> None:
    stack = make_stack(store)
    ids, previews = [], []
    for i in range(3):
        preview = started(store, stack, now=NOW + 10 * i, dry_run=True)
        previews.append(preview.id)
        update = started(store, stack, now=NOW + 10 * i + 1)
        ok(store.complete_update(update.id, "t", NOW + 10 * i + 2, "succeeded", 0))
        ids.append(update.id)
    ok(store.create_update(new_update(stack.id)))  # never started: not history
    history = ok(store.list_history(stack.id, 1, 10, previews=False))
    assert [u.id for u in history] == ids[::-1]
    assert [u.version for u in history] == [3, 2, 1]
    assert history[0].config == {"web:size": {"string": "3", "secret": False, "object": False}}
    assert history[0].metadata == {"message": "hi", "environment": {"exec.kind": "cli"}}
    assert [u.id for u in ok(store.list_history(stack.id, 1, 2, False))] == ids[:0:-1]
    assert [u.id for u in ok(store.list_history(stack.id, 2, 2, False))] == ids[:1]
    assert ok(store.list_history(stack.id, 3, 2, False)) == []
    # With previews, each preview (of version N-1) follows the update that made version N.
    everything = [ids[2], previews[2], ids[1], previews[1], ids[0], previews[0]]
    assert [u.id for u in ok(store.list_history(stack.id, 1, 10))] == everything
    # Page 0 is every entry, whatever the page size.
    assert [u.id for u in ok(store.list_history(stack.id, 0, 1))] == everything
    assert [u.id for u in ok(store.list_history(stack.id, 2, 2))] == everything[2:4]
    [one] = ok(store.list_history(stack.id, 1, 1))
    assert ok(store.get_update_by_version(stack.id, 2)) == ok(store.get_update(ids[1]))
    assert ok(store.get_update_by_version(stack.id, 9)) is None
    assert one.id == ids[2]


def test_history_shows_a_running_update(store: Store) -> None:
    stack = make_stack(store)
    update = started(store, stack)
    [entry] = ok(store.list_history(stack.id, 1, 10))
    assert (entry.id, entry.status) == (update.id, "running")


# -- events -------------------------------------------------------------------------------


def test_events_idempotent_and_ordered(store: Store) -> None:
    stack = make_stack(store)
    update = started(store, stack)
    other = started(store, stack, dry_run=True)
    ok(
        store.append_events(
            [
                (update.id, [StoredEvent(2, b'{"s":2}'), StoredEvent(0, b'{"s":0}')]),
                (other.id, [StoredEvent(0, b'{"other":0}')]),
            ],
            {},
        )
    )
    ok(
        store.append_events(
            [(update.id, [StoredEvent(1, b'{"s":1}'), StoredEvent(2, b'{"dup":2}')])], {}
        )
    )
    events = ok(store.get_events(update.id, -1, 100))
    assert events == [
        StoredEvent(0, b'{"s":0}'),
        StoredEvent(1, b'{"s":1}'),
        StoredEvent(2, b'{"s":2}'),
    ]
    assert ok(store.get_events(update.id, 0, 1)) == [StoredEvent(1, b'{"s":1}')]
    assert ok(store.get_events(update.id, 2, 100)) == []
    assert ok(store.get_events(other.id, -1, 100)) == [StoredEvent(0, b'{"other":0}')]
    assert ok(store.get_events("no-such-update", -1, 100)) == []


def test_event_summaries_land_on_the_update(store: Store) -> None:
    stack = make_stack(store)
    update = started(store, stack)
    ok(store.append_events([], {update.id: {"create": 2, "same": 1}}))
    stored = ok(store.get_update(update.id))
    assert stored is not None and stored.resource_changes == {"create": 2, "same": 1}


# -- durability ---------------------------------------------------------------------------


def test_reopen_keeps_data(opener: Callable[[Path], Store], tmp_path: Path) -> None:
    first = opener(tmp_path)
    try:
        stack = ok(first.create_stack(ref(), {"a": "1"}, NOW, blob("state", 1)))
        ok(first.set_meta_if_absent("canary", b"c"))
        update = started(first, stack)
        ok(first.append_events([(update.id, [StoredEvent(0, b"{}")])], {}))
    finally:
        first.close()
    for _ in range(2):
        again = opener(tmp_path)
        try:
            record = ok(again.get_stack(ref()))
            assert record is not None
            assert (record.tags, record.version, record.locked_by) == ({"a": "1"}, 1, update.id)
            assert ok(again.get_meta("canary")) == b"c"
            assert state_text(again, record.id, None) == "state"
            assert ok(again.get_events(update.id, -1, 10)) == [StoredEvent(0, b"{}")]
        finally:
            again.close()


def test_errors_are_pulumid_errors(store: Store) -> None:
    make_stack(store)
    error = fails(store.create_stack(ref(), {}, NOW, None), PulumidError)
    assert error.body() == {"code": 409, "message": error.message}


def journaling(store: Store, stack: StackRecord, *, now: float = NOW) -> UpdateRecord:
    update = new_update(stack.id, created=now)
    ok(store.create_update(update))
    return ok(store.start_update(update.id, "t", now, now + TTL, None, 1, "v3.259.0"))


def test_journal_batches_kept_in_order_until_the_update_ends(store: Store) -> None:
    stack = make_stack(store)
    update = journaling(store, stack)
    assert update.journal_version == 1 and update.engine_version == "v3.259.0"
    ok(store.append_journal(update.id, "t", NOW + 1, b"first"))
    ok(store.append_journal(update.id, "t", NOW + 2, b"second"))
    assert ok(store.get_journal(update.id)) == [b"first", b"second"]
    # A node that holds the first batch reads only what came after it.
    assert ok(store.get_journal(update.id, after=1)) == [b"second"]
    assert ok(store.get_journal(update.id, after=2)) == []
    fails(store.append_journal(update.id, "wrong", NOW + 3, b"x"), Forbidden)
    ok(store.complete_update(update.id, "t", NOW + 4, "failed", 0, blob("replayed", 2)))
    # The materialised state is version N; the batches are gone.
    assert ok(store.get_journal(update.id)) == []
    assert state_text(store, stack.id, None) == "replayed"
    assert stack_of(store, stack).resource_count == 2
    fails(store.append_journal(update.id, "t", NOW + 5, b"late"), Conflict)


def test_journal_refused_without_journaling(store: Store) -> None:
    update = started(store, make_stack(store))
    fails(store.append_journal(update.id, "t", NOW + 1, b"x"), BadRequest)


def test_deltas_superseded_by_a_full_checkpoint(store: Store) -> None:
    stack = make_stack(store)
    update = started(store, stack)
    ok(store.save_checkpoint(update.id, "t", NOW + 1, blob("full", 1), 1))
    ok(store.save_delta(update.id, "t", NOW + 2, 2, b"d2"))
    ok(store.save_delta(update.id, "t", NOW + 3, 3, b"d3"))
    ok(store.save_delta(update.id, "t", NOW + 3, 3, b"d3"))  # a retry
    assert ok(store.get_deltas(update.id)) == [(2, b"d2"), (3, b"d3")]
    record = ok(store.get_update(update.id))
    assert record is not None and record.checkpoint_seq == 3
    ok(store.save_checkpoint(update.id, "t", NOW + 4, blob("full again", 1), 4))
    assert ok(store.get_deltas(update.id)) == []
    ok(store.save_delta(update.id, "t", NOW + 5, 5, b"d5"))
    ok(store.cancel_update(update.id, NOW + 6, blob("materialised", 1)))
    assert ok(store.get_deltas(update.id)) == []
    assert state_text(store, stack.id, None) == "materialised"


def test_previews_cannot_write_deltas_or_journals(store: Store) -> None:
    preview = started(store, make_stack(store), dry_run=True)
    fails(store.save_delta(preview.id, "t", NOW + 1, 1, b"d"), Forbidden)
    fails(store.append_journal(preview.id, "t", NOW + 1, b"j"), Forbidden)


def test_check_lease_with_the_stack_it_belongs_to(store: Store) -> None:
    stack = make_stack(store)
    other = make_stack(store, "other")
    update = started(store, stack)
    assert ok(store.check_lease(update.id, "t", NOW + 1, stack.ref)).id == update.id
    fails(store.check_lease(update.id, "t", NOW + 1, other.ref), NotFound)
    fails(store.check_lease(update.id, "wrong", NOW + 1, stack.ref), Forbidden)


def test_prune_by_retention_rules(store: Store) -> None:
    stack = make_stack(store)
    preview = started(store, stack, dry_run=True)
    ok(store.complete_update(preview.id, "t", NOW + 1, "succeeded", 0))
    first = started(store, stack, now=NOW + 2)
    ok(store.append_events([(first.id, [StoredEvent(1, b"{}")])], {}))
    ok(store.complete_update(first.id, "t", NOW + 3, "succeeded", 0))
    second = started(store, stack, now=NOW + 4)
    ok(store.complete_update(second.id, "t", NOW + 5, "succeeded", 0))
    unstarted = new_update(stack.id, created=NOW)
    ok(store.create_update(unstarted))
    none = RetentionRules()
    zero = {
        "events": 0,
        "previews": 0,
        "updates": 0,
        "unstarted": 0,
        "claims": 0,
        "tokens": 0,
        "audit": 0,
    }
    assert ok(store.prune(none)) == zero
    everything = RetentionRules(NOW + 10, NOW + 10, NOW + 10, NOW + 10, NOW + 10)
    # The current version's update stays; the older one goes with its events.
    assert ok(store.prune(everything)) == {
        "events": 1,
        "previews": 1,
        "updates": 1,
        "unstarted": 1,
        "claims": 0,
        "tokens": 0,
        "audit": 0,
    }
    assert [u.id for u in ok(store.list_history(stack.id, 0, 10))] == [second.id]
    assert ok(store.get_update(unstarted.id)) is None
    assert ok(store.get_events(first.id, -1, 10)) == []


def test_claims_one_holder_at_a_time(store: Store) -> None:
    assert ok(store.claim("retention", "node-a", NOW, NOW + 60)) is True
    # Live: another node is turned away, the holder may renew.
    assert ok(store.claim("retention", "node-b", NOW + 30, NOW + 90)) is False
    assert ok(store.claim("retention", "node-a", NOW + 30, NOW + 90)) is True
    assert ok(store.claim("retention", "node-b", NOW + 89, NOW + 150)) is False
    # Run out: anyone takes it over, and the old holder is the one turned away.
    assert ok(store.claim("retention", "node-b", NOW + 90, NOW + 150)) is True
    assert ok(store.claim("retention", "node-a", NOW + 100, NOW + 160)) is False
    # Names are independent.
    assert ok(store.claim("expire:u1", "node-a", NOW + 100, NOW + 160)) is True
    # Claims that ran out before the cut-off are pruned; live ones stay.
    counts = ok(store.prune(RetentionRules(claims_before=NOW + 155)))
    assert counts["claims"] == 1
    assert ok(store.claim("expire:u1", "node-c", NOW + 156, NOW + 200)) is False
    assert ok(store.claim("retention", "node-c", NOW + 156, NOW + 200)) is True


def test_referenced_blobs_finds_values_by_prefix(store: Store) -> None:
    # What the metadata store holds: a split store's own references would hide the marker.
    store = store.meta if isinstance(store, BlobbedStore) else store
    marker = b"\x00marker:"
    stack = make_stack(store, initial=StateBlob(marker + b"initial", 0))
    make_stack(store, "other", initial=blob("{}"))
    update = journaling(store, stack)
    assert update.token_hash
    ok(store.append_journal(update.id, update.token_hash, NOW + 1, marker + b"batch"))
    ok(store.append_journal(update.id, update.token_hash, NOW + 1, b"plain batch"))
    plain = started(store, make_stack(store, "third"), now=NOW + 2)
    assert plain.token_hash
    ok(store.save_delta(plain.id, plain.token_hash, NOW + 3, 1, marker + b"delta"))
    # Starting an update copies version N-1 to N: one value may be referenced by two rows.
    values: list[bytes] = ok(store.referenced_blobs(marker))
    found = set(values)
    assert found == {marker + b"initial", marker + b"batch", marker + b"delta"}
    assert ok(store.referenced_blobs(b"\x00nothing:")) == []
