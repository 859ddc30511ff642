"""The Backend driven by a fake clock, over SQLite with inline runners."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pulumid.auth.tokens import hash_token
from pulumid.config import Config
from pulumid.engine import deployments
from pulumid.engine.backend import Backend, continuation_token, parse_continuation
from pulumid.engine.events import EventWriter
from pulumid.engine.inflight import InFlight
from pulumid.engine.secrets import StackSecrets
from pulumid.errors import BadRequest, Conflict, Forbidden, NotFound
from pulumid.secrets.crypto import MasterKey
from pulumid.secrets.keys import Keyring, LocalKey
from pulumid.services.timers import SafeTimer
from pulumid.storage.records import StackRef, StoredEvent, UpdateRecord
from pulumid.storage.sqlite import SQLiteStore
from pulumid.threads import InlineRunner

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

START = 1_700_000_000.0
TTL = 60.0
ORG = "acme"
_sync = SynchronousTestCase()


def ok(coro: Any) -> Any:
    d: Deferred[Any] = Deferred.fromCoroutine(coro)
    return _sync.successResultOf(d)


def fails(coro: Any, kind: type[E]) -> E:
    d: Deferred[Any] = Deferred.fromCoroutine(coro)
    error = _sync.failureResultOf(d, kind).value
    assert isinstance(error, kind)
    return error


@dataclass
class Env:
    backend: Backend
    clock: Clock
    store: SQLiteStore
    events: EventWriter

    def ref(self, name: str = "dev", project: str = "web") -> StackRef:
        return StackRef(ORG, project, name)

    def create(self, name: str = "dev", project: str = "web", **body: Any) -> StackRef:
        ok(self.backend.create_stack(ORG, project, {"stackName": name, **body}))
        return self.ref(name, project)

    def start(self, ref: StackRef, *, kind: str = "update", dry_run: bool = False) -> UpdateRecord:
        update_id = ok(
            self.backend.create_update(ref, kind, {"options": {"dryRun": dry_run}, "name": "web"})
        )
        started: UpdateRecord = ok(self.backend.start_update(ref, update_id, {}))
        return started

    def status(self, update_id: str) -> str:
        update = _sync.successResultOf(self.store.get_update(update_id))
        assert update is not None
        return update.status


def _env(tmp_path: Path, **overrides: Any) -> Env:
    settings: dict[str, Any] = {
        "database": str(tmp_path / "db.sqlite"),
        "token": "test-token-123",
        "organization": ORG,
        "user": "alice",
        "lease_ttl": TTL,
        **overrides,
    }
    config = Config(**settings)
    store = SQLiteStore.open(config.sqlite_path, InlineRunner())
    clock = Clock()
    clock.advance(START)
    cpu = InlineRunner()
    secrets = StackSecrets(store, Keyring(LocalKey(MasterKey.generate())), cpu)
    events = EventWriter(store)
    inflight = InFlight(store, cpu, clock, config.max_body_size)
    backend = Backend(config, store, clock, cpu, secrets, events, inflight)
    return Env(backend, clock, store, events)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = _env(tmp_path)
    try:
        yield e
    finally:
        e.store.close()


def deployment_body(resources: list[dict[str, Any]] | None = None, version: int = 3) -> bytes:
    document = {
        "version": version,
        "deployment": {
            "manifest": {"time": "2024-01-01T00:00:00Z", "magic": "", "version": ""},
            "resources": resources or [],
        },
    }
    return json.dumps(document).encode()


def exported(env: Env, ref: StackRef, version: int | None = None) -> dict[str, Any]:
    blob = ok(env.backend.export(ref, version))
    document: dict[str, Any] = json.loads(deployments.gunzip_blocking(blob.gzipped, 1 << 30))
    return document


# -- leases -------------------------------------------------------------------------------


def test_expired_lease_frees_the_stack(env: Env) -> None:
    ref = env.create()
    update = env.start(ref)
    assert update.lease_expires == START + TTL
    assert ok(env.backend.expire_leases()) == []
    env.clock.advance(TTL + 1)
    assert ok(env.backend.expire_leases()) == [update.id]
    assert env.status(update.id) == "failed"
    assert ok(env.backend.stack(ref)).locked_by is None
    assert update.token
    fails(env.backend.checkpoint(ref, update.id, update.token, deployment_body()), Conflict)
    # The next update starts at once.
    assert env.start(ref).status == "running"


def test_renewed_lease_survives(env: Env) -> None:
    ref = env.create()
    update = env.start(ref)
    assert update.token
    for _ in range(2):
        env.clock.advance(TTL - 1)
        expires = ok(env.backend.renew_lease(ref, update.id, update.token, 300))
        # The configured TTL caps what the CLI asks for.
        assert expires == env.clock.seconds() + TTL
        assert ok(env.backend.expire_leases()) == []
    env.clock.advance(TTL - 1)
    assert ok(env.backend.expire_leases()) == []
    ok(env.backend.checkpoint(ref, update.id, update.token, deployment_body()))
    assert env.status(update.id) == "running"


def test_lease_without_renewal_expires_for_update_token_calls(env: Env) -> None:
    ref = env.create()
    update = env.start(ref)
    assert update.token
    env.clock.advance(TTL + 1)
    fails(env.backend.renew_lease(ref, update.id, update.token, 300), Forbidden)
    fails(
        env.backend.post_events(ref, update.id, update.token, {"events": [{"sequence": 0}]}),
        Forbidden,
    )


def test_renew_validation(env: Env) -> None:
    ref = env.create()
    update = env.start(ref)
    assert update.token
    for bad in (-1, 301, "300", True, None):
        fails(env.backend.renew_lease(ref, update.id, update.token, bad), BadRequest)
    fails(env.backend.renew_lease(ref, update.id, "wrong", 300), Forbidden)


def test_second_start_conflicts(env: Env) -> None:
    ref = env.create()
    env.start(ref)
    update_id = ok(env.backend.create_update(ref, "update", {}))
    error = fails(env.backend.start_update(ref, update_id, {}), Conflict)
    assert error.message == "Conflict: Another update is currently in progress."


# -- dry runs -----------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "dry_run"), [("update", True), ("preview", False)])
def test_dry_runs_neither_lock_nor_bump(env: Env, kind: str, dry_run: bool) -> None:
    ref = env.create()
    preview = env.start(ref, kind=kind, dry_run=dry_run)
    assert preview.dry_run
    assert preview.version == 0
    stack = ok(env.backend.stack(ref))
    assert (stack.version, stack.locked_by) == (0, None)
    assert preview.token
    fails(env.backend.checkpoint(ref, preview.id, preview.token, deployment_body()), Forbidden)
    real = env.start(ref)
    assert real.version == 1
    ok(env.backend.complete(ref, preview.id, preview.token, "succeeded"))
    assert ok(env.backend.stack(ref)).locked_by == real.id
    assert [u.id for u in ok(env.backend.history(ref, 1, 10))] == [real.id, preview.id]
    assert ok(env.backend.latest(ref)).id == real.id


# -- events -------------------------------------------------------------------------------


def test_events_are_stored_before_the_answer_and_read_in_order(env: Env) -> None:
    ref = env.create()
    update = env.start(ref)
    assert update.token
    batches = [[{"sequence": 2}, {"sequence": 3}], [{"sequence": 0}, {"sequence": 1}]]
    for batch in batches:
        ok(env.backend.post_events(ref, update.id, update.token, {"events": batch}))
    # Acknowledged means committed: nothing waits in memory for a timer.
    stored = _sync.successResultOf(env.store.get_events(update.id, -1, 100))
    assert sorted(e.sequence for e in stored) == [0, 1, 2, 3]
    assert env.events.commits == 2
    ok(env.backend.complete(ref, update.id, update.token, "succeeded"))
    stored = _sync.successResultOf(env.store.get_events(update.id, -1, 100))
    assert [e.sequence for e in stored] == [0, 1, 2, 3]
    assert [json.loads(e.data) for e in stored] == [{"sequence": i} for i in range(4)]
    events, token = ok(env.backend.get_events(ref, update.id, None))
    assert [e.sequence for e in events] == [0, 1, 2, 3]
    assert token is None


def test_large_events_are_stored_gzipped_and_read_back_as_sent(env: Env) -> None:
    ref = env.create()
    update = env.start(ref)
    assert update.token
    outputs = {"payload": "abc/" * 4096}  # 16 KB, as a resource event carries its outputs
    sent = [
        {"sequence": 0, "diagnosticEvent": {"message": "small"}},
        {"sequence": 1, "resOutputsEvent": {"metadata": {"new": {"outputs": outputs}}}},
    ]
    ok(env.backend.post_events(ref, update.id, update.token, {"events": sent}))
    # A row an older pulumid wrote: large, and not compressed.
    old = {"sequence": 2, "resOutputsEvent": {"metadata": {"old": {"outputs": outputs}}}}
    _sync.successResultOf(
        env.store.append_events([(update.id, [StoredEvent(2, json.dumps(old).encode())])], {})
    )
    stored = _sync.successResultOf(env.store.get_events(update.id, -1, 100))
    small, large, legacy = (e.data for e in stored)
    assert json.loads(small) == sent[0]
    assert large[:2] == b"\x1f\x8b" and len(large) < 1024  # 16 KB of text in under 1 KB
    assert legacy[:1] == b"{"
    events, _token = ok(env.backend.get_events(ref, update.id, None))
    assert [json.loads(e.data) for e in events] == [*sent, old]


def test_events_of_a_running_update_keep_a_token(env: Env) -> None:
    ref = env.create()
    update = env.start(ref)
    assert update.token
    ok(env.backend.post_events(ref, update.id, update.token, {"events": [{"sequence": 0}]}))
    events, token = ok(env.backend.get_events(ref, update.id, None))
    assert [e.sequence for e in events] == [0]
    assert token == "0"
    events, token = ok(env.backend.get_events(ref, update.id, token))
    assert (events, token) == ([], "0")
    fails(env.backend.get_events(ref, update.id, "x"), BadRequest)


def test_events_validation(env: Env) -> None:
    ref = env.create()
    update = env.start(ref)
    assert update.token
    bodies: list[Any] = [
        {"events": []},
        {},
        [],
        {"events": [{"sequence": "1"}]},
        {"events": [1]},
        {"events": [{"sequence": 2**63}]},
        {"events": [{"sequence": -1}]},
        {"events": [{"sequence": True}]},
    ]
    for body in bodies:
        fails(env.backend.post_events(ref, update.id, update.token, body), BadRequest)


def test_summary_resource_changes_land_in_history(env: Env) -> None:
    ref = env.create()
    update = env.start(ref)
    assert update.token
    summary = {
        "sequence": 0,
        "summaryEvent": {"resourceChanges": {"create": 2, "same": 1}, "result": "succeeded"},
    }
    ok(env.backend.post_events(ref, update.id, update.token, {"events": [summary]}))
    ok(env.backend.complete(ref, update.id, update.token, "succeeded"))
    [entry] = ok(env.backend.history(ref, 1, 10))
    assert entry.resource_changes == {"create": 2, "same": 1}
    assert ok(env.backend.latest(ref)).id == update.id


def test_complete_validation(env: Env) -> None:
    ref = env.create()
    update = env.start(ref)
    assert update.token
    fails(env.backend.complete(ref, update.id, update.token, "done"), BadRequest)
    fails(env.backend.complete(ref, update.id, "wrong", "succeeded"), Forbidden)
    ok(env.backend.complete(ref, update.id, update.token, "failed"))
    ok(env.backend.complete(ref, update.id, update.token, "failed"))


# -- stacks -------------------------------------------------------------------------------


def test_create_validation(env: Env) -> None:
    fails(env.backend.create_stack(ORG, "web", {}), BadRequest)
    fails(env.backend.create_stack(ORG, "web", {"stackName": "bad name"}), BadRequest)
    fails(
        env.backend.create_stack(ORG, "web", {"stackName": "s", "tags": {"bad tag": "x"}}),
        BadRequest,
    )
    fails(env.backend.create_stack(ORG, "web", {"stackName": "s", "teams": ["a"]}), BadRequest)
    fails(env.backend.create_stack("nobody", "web", {"stackName": "s"}), NotFound)
    env.create()
    fails(env.backend.create_stack(ORG, "web", {"stackName": "dev"}), Conflict)


def test_an_export_racing_the_end_of_an_update_serves_what_it_left(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The export of a running journaling update rebuilds its progress from the store; if the
    # update ends between the journal's length and its read, the journal is deleted under
    # the read. The answer must then be the state the update left, not its bare base.
    ref = env.create()
    update_id = ok(env.backend.create_update(ref, "update", {"options": {}, "name": "web"}))
    update = ok(env.backend.start_update(ref, update_id, {"journalVersion": 1}, "3.259"))
    token = update.token
    state = {"urn": "urn:pulumi:dev::web::test:index:Item::a", "custom": True, "type": "t"}
    entries = [
        {"version": 1, "kind": 0, "sequenceID": 1, "operationID": 1},
        {"version": 1, "kind": 1, "sequenceID": 2, "operationID": 1, "state": state},
    ]
    body = json.dumps({"entries": entries}).encode()
    ok(env.backend.journal_entries(ref, update_id, token, body, body))
    env.backend.inflight.forget(update_id)  # another node's update: nothing cached here
    read_journal = env.store.get_journal

    def ends_first(update_id: str, after: int = 0) -> Deferred[list[bytes]]:
        # Another node ends the update here: it builds the final state and commits it,
        # which deletes the journal.
        monkeypatch.setattr(env.store, "get_journal", read_journal)
        other = InFlight(env.store, InlineRunner(), env.clock, env.backend.config.max_body_size)
        final = ok(other.finish(update))
        _sync.successResultOf(
            env.store.complete_update(
                update_id, hash_token(token), env.clock.seconds(), "succeeded", 10, final, None
            )
        )
        return read_journal(update_id, after)

    monkeypatch.setattr(env.store, "get_journal", ends_first)
    resources = exported(env, ref)["deployment"].get("resources") or []
    assert [r["urn"] for r in resources] == [state["urn"]]
    assert env.status(update_id) == "succeeded"
    assert update_id not in env.backend.inflight.journals  # nothing kept for an ended update


def test_create_with_state_exports_it(env: Env) -> None:
    state = json.loads(deployment_body([{"urn": "urn:pulumi:dev::web::a:b:C::x"}]))
    ref = env.create(state=state)
    stack = ok(env.backend.stack(ref))
    assert (stack.version, stack.resource_count) == (0, 1)
    assert exported(env, ref) == state


def test_empty_stack_exports_a_valid_document(env: Env) -> None:
    ref = env.create()
    document = exported(env, ref)
    assert document["version"] == 3
    assert isinstance(document["deployment"], dict)


def test_stack_list_paging(tmp_path: Path) -> None:
    env = _env(tmp_path, page_size=2)
    try:
        names = [f"s{i}" for i in range(5)]
        for name in names:
            env.create(name)
        seen: list[str] = []
        tokens: list[str | None] = []
        token: str | None = None
        while True:
            stacks, token = ok(env.backend.list_stacks(None, None, None, None, token))
            seen.extend(s.name for s in stacks)
            tokens.append(token)
            if token is None:
                break
        assert seen == names
        assert len(tokens) == 3 and tokens[-1] is None
        # A last page that is exactly full still ends with a null token.
        env.create("s5")
        pages = 0
        token = None
        while True:
            stacks, token = ok(env.backend.list_stacks(ORG, None, None, None, token))
            pages += 1
            assert stacks
            if token is None:
                break
        assert pages == 3
        assert ok(env.backend.list_stacks("other-org", None, None, None, None)) == ([], None)
        fails(env.backend.list_stacks(None, None, None, None, "abc"), BadRequest)
    finally:
        env.store.close()


def test_stack_list_unicode_digit_token_is_a_bad_request(env: Env) -> None:
    fails(env.backend.list_stacks(None, None, None, None, "\u00b2"), BadRequest)


def test_continuation_tokens_round_trip_and_refuse_anything_else() -> None:
    # The longest names a stack may have still fit the token's 1,024-character bound.
    longest = StackRef("o" * 100, "p" * 100, "s" * 100)
    token = continuation_token(longest)
    assert len(token) <= 1024 and parse_continuation(token) == longest
    assert parse_continuation(continuation_token(StackRef("é", "ü", "ß"))) == StackRef(
        "é", "ü", "ß"
    )

    def encoded(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    refused = [
        # A well-formed key, but longer than any token the server gives out.
        encoded(json.dumps(["o", "p", "x" * 800])),
        "\u00e9t\u00e9",
        "!!!!",
        encoded("not json"),
        encoded('{"org": "o"}'),
        encoded('["o", "p"]'),
        encoded('["o", "p", "s", "t"]'),
        encoded('["o", "p", 3]'),
    ]
    for bad in refused:
        with pytest.raises(BadRequest, match="invalid continuation token"):
            parse_continuation(bad)


def test_delete_stack(env: Env) -> None:
    ref = env.create()
    ok(env.backend.import_state(ref, deployment_body([{"urn": "u"}])))
    error = fails(env.backend.delete_stack(ref, False), BadRequest)
    assert error.message == "Bad Request: Stack still contains resources."
    ok(env.backend.delete_stack(ref, True))
    fails(env.backend.stack(ref), NotFound)


def test_tags(env: Env) -> None:
    ref = env.create(tags={"a": "1"})
    ok(env.backend.set_tags(ref, {"b": "2"}))
    assert ok(env.backend.stack(ref)).tags == {"b": "2"}
    fails(env.backend.set_tags(ref, {"b": 2}), BadRequest)
    fails(env.backend.set_tags(ref, {"b": "x" * 257}), BadRequest)
    fails(env.backend.set_tags(ref, ["b"]), BadRequest)


# -- rename -------------------------------------------------------------------------------


def _urn(stack: str, project: str, type_: str, name: str) -> str:
    return f"urn:pulumi:{stack}::{project}::{type_}::{name}"


def test_rename_rewrites_urns_and_keeps_secrets(env: Env) -> None:
    ref = env.create()
    root = _urn("dev", "web", "pulumi:pulumi:Stack", "web-dev")
    child = _urn("dev", "web", "random:index:Pet", "pet")
    foreign = _urn("prod", "other", "random:index:Pet", "far")
    document = {
        "version": 3,
        "deployment": {
            "manifest": {"time": "2024-01-01T00:00:00Z", "magic": "", "version": ""},
            "secrets_providers": {
                "type": "service",
                "state": {"url": "http://x", "owner": ORG, "project": "web", "stack": "dev"},
            },
            "resources": [
                {"urn": root, "type": "pulumi:pulumi:Stack", "custom": False},
                {"urn": child, "parent": root, "dependencies": [root, foreign], "custom": True},
            ],
        },
    }
    ok(env.backend.import_state(ref, json.dumps(document).encode()))
    [ciphertext] = ok(env.backend.encrypt(ref, [b"hunter2"]))
    ok(env.backend.rename_stack(ref, "site", "prod"))
    new = env.ref("prod", "site")
    fails(env.backend.stack(ref), NotFound)
    stack = ok(env.backend.stack(new))
    assert stack.version == 2
    renamed = exported(env, new)["deployment"]
    new_root = _urn("prod", "site", "pulumi:pulumi:Stack", "site-prod")
    new_child = _urn("prod", "site", "random:index:Pet", "pet")
    assert [r["urn"] for r in renamed["resources"]] == [new_root, new_child]
    assert renamed["resources"][1]["parent"] == new_root
    assert renamed["resources"][1]["dependencies"] == [new_root, foreign]
    assert renamed["secrets_providers"]["state"]["project"] == "site"
    assert renamed["secrets_providers"]["state"]["stack"] == "prod"
    # The state before the rename still names the old stack: decryption works there too.
    assert ok(env.backend.decrypt(ref, [ciphertext])) == [b"hunter2"]
    assert ok(env.backend.decrypt(new, [ciphertext])) == [b"hunter2"]
    [entry, _import] = ok(env.backend.history(new, 1, 10))
    assert (entry.kind, entry.version) == ("rename", 2)
    # Old version still exports the pre-rename document.
    assert exported(env, new, 1) == document


def test_rename_validation(env: Env) -> None:
    ref = env.create()
    env.create("taken")
    fails(env.backend.rename_stack(ref, "", "dev"), BadRequest)
    fails(env.backend.rename_stack(ref, "", "bad name"), BadRequest)
    fails(env.backend.rename_stack(ref, "", "taken"), Conflict)
    # A stack without state renames without a history entry.
    ok(env.backend.rename_stack(ref, "", "fresh"))
    assert ok(env.backend.stack(env.ref("fresh"))).version == 0


# -- export / import ----------------------------------------------------------------------


def test_export_versions(tmp_path: Path) -> None:
    env = _env(tmp_path, state_versions=2)
    try:
        ref = env.create()
        for i in range(3):
            ok(env.backend.import_state(ref, deployment_body([{"urn": f"u{i}"}])))
        assert exported(env, ref, 3)["deployment"]["resources"] == [{"urn": "u2"}]
        assert exported(env, ref, 2)["deployment"]["resources"] == [{"urn": "u1"}]
        assert exported(env, ref)["deployment"]["resources"] == [{"urn": "u2"}]
        for version in (0, 4, 99):
            fails(env.backend.export(ref, version), NotFound)
        # Pruned.
        assert "no longer kept" in fails(env.backend.export(ref, 1), NotFound).message
        fails(env.backend.export(env.ref("nope"), None), NotFound)
    finally:
        env.store.close()


def test_import_keeps_the_bytes(env: Env) -> None:
    ref = env.create()
    body = b'{"version":3,"deployment":{"resources":[{"urn":"\\u003cx\\u003e","n":1.50}]}}'
    update_id = ok(env.backend.import_state(ref, body))
    assert deployments.gunzip_blocking(ok(env.backend.export(ref, None)).gzipped, 1 << 20) == body
    update = ok(env.backend.update_status(ref, update_id))
    assert (update.status, update.kind, update.version) == ("succeeded", "import", 1)


@pytest.mark.parametrize(
    "body",
    [
        deployment_body(version=0),
        deployment_body(version=5),
        b'{"version":3}',
        b'{"version":3,"deployment":null}',
        b'{"version":3,"deployment":{"resources":{"a":1}}}',
        b'{"version":"3","deployment":{}}',
        b"[]",
        b"not json",
        b"\xff\xfe",
    ],
    ids=[
        "v0",
        "v5",
        "no-deployment",
        "null-deployment",
        "bad-resources",
        "string-version",
        "array",
        "not-json",
        "not-utf8",
    ],
)
def test_import_validation(env: Env, body: bytes) -> None:
    ref = env.create()
    error = fails(env.backend.import_state(ref, body), BadRequest)
    assert error.status == 400
    assert ok(env.backend.stack(ref)).version == 0


def test_import_conflicts_with_a_running_update(env: Env) -> None:
    ref = env.create()
    env.start(ref)
    fails(env.backend.import_state(ref, deployment_body()), Conflict)


def test_checkpoint_then_export(env: Env) -> None:
    ref = env.create()
    update = env.start(ref)
    assert update.token
    body = b'{"isInvalid":false,"version":3,"deployment":{"resources":[{"urn":"\\u003c"}]}}'
    ok(env.backend.checkpoint(ref, update.id, update.token, body))
    blob = ok(env.backend.export(ref, 1))
    text = deployments.gunzip_blocking(blob.gzipped, 1 << 20)
    assert text == b'{"version":3,"deployment":{"resources":[{"urn":"\\u003c"}]}}'
    verbatim = b'{"version":3,"untypedDeployment":{"version":3,"deployment":{}},"sequenceNumber":1}'
    ok(env.backend.checkpoint_verbatim(ref, update.id, update.token, verbatim))
    blob = ok(env.backend.export(ref, None))
    assert deployments.gunzip_blocking(blob.gzipped, 1 << 20) == b'{"version":3,"deployment":{}}'
    fails(env.backend.checkpoint(ref, update.id, "wrong", body), Forbidden)


# -- timers -------------------------------------------------------------------------------


def test_safe_timer_survives_a_failing_tick() -> None:
    clock = Clock()
    calls: list[float] = []

    def tick() -> Deferred[None]:
        calls.append(clock.seconds())
        if len(calls) == 1:
            raise RuntimeError("boom")
        if len(calls) == 2:
            return fail(ValueError("async boom"))
        return succeed(None)

    async def run() -> None:
        await tick()

    timer = SafeTimer("t", 5.0, run, clock=clock)
    timer.startService()
    try:
        assert calls == [0.0]
        assert timer.failures == 1
        clock.advance(5)
        assert calls == [0.0, 5.0]
        assert timer.failures == 2
        clock.advance(5)
        clock.advance(5)
        assert calls == [0.0, 5.0, 10.0, 15.0]
        assert timer.failures == 2
    finally:
        timer.stopService()
    clock.advance(50)
    assert len(calls) == 4


def test_a_timer_may_leave_its_running_tick_behind_at_stop() -> None:
    # An ACME order can poll its CA for 90 s: the daemon's exit must not wait for it.
    clock = Clock()
    for wait in (True, False):
        pending: Deferred[None] = Deferred()

        async def tick(pending: Deferred[None] = pending) -> None:
            await pending

        timer = SafeTimer("t", 5.0, tick, clock=clock, wait_on_stop=wait)
        timer.startService()
        stopping = timer.stopService()
        if wait:
            assert isinstance(stopping, Deferred) and not stopping.called
            pending.callback(None)
            assert stopping.called
        else:
            assert stopping is None
            pending.callback(None)
