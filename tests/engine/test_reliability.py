"""Regression tests for issue 13's classes: each bad input, race or crash stays contained.

Class numbers in the test names follow the issue: 2 isolation, 3 validation at the door,
4 failure at the end, 5 order, 6 memory, 7 the reactor, 10 growth. The HTTP door (1), the
storage faults and files (8, 9) and the API semantics (11) are in tests/api and
tests/contract.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher

from pulumid.engine import deployments
from pulumid.engine.backend import DAY
from pulumid.engine.events import EventWriter
from pulumid.engine.inflight import INLINE_JOURNAL, CostLRU, InFlight
from pulumid.engine.journal import JournalReplayer
from pulumid.errors import BadRequest, Conflict, NotFound, Unavailable
from pulumid.storage.records import StoredEvent, UpdateRecord
from pulumid.threads import InlineRunner
from tests.engine.test_backend import Env, _env, _sync, deployment_body, exported, fails, ok
from tests.engine.test_inflight import (
    PET,
    STACK,
    _delta_update,
    _journaling,
    delta,
    journal_batch,
    urns,
    verbatim,
)

P = ParamSpec("P")
T = TypeVar("T")


@pytest.fixture
def env(tmp_path: Path) -> Any:
    e = _env(tmp_path)
    yield e
    e.store.close()


@pytest.fixture
def logged() -> Any:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def record(env: Env, update_id: str) -> UpdateRecord:
    update = _sync.successResultOf(env.store.get_update(update_id))
    assert update is not None
    return update


def entries_body(*entries: dict[str, Any]) -> bytes:
    return json.dumps({"entries": list(entries)}).encode()


def created(seq: int, op: int, urn: str, **extra: Any) -> list[dict[str, Any]]:
    """A begin and a success entry that create the resource `urn`."""
    state = {"urn": urn, "custom": True, "type": "test:index:Item", "id": f"id{op}", **extra}
    return [
        {"version": 1, "kind": 0, "sequenceID": seq, "operationID": op},
        {"version": 1, "kind": 1, "sequenceID": seq + 1, "operationID": op, "state": state},
    ]


def item(name: str) -> str:
    return f"urn:pulumi:dev::web::test:index:Item::{name}"


# -- 2: one bad input hurts no one else ----------------------------------------------------


class _FlakyStore:
    """append_events fails for updates named in `bad`, whatever else is in the group."""

    def __init__(self, bad: set[str]) -> None:
        self.bad = bad
        self.written: list[str] = []
        self.pending: list[Deferred[None]] = []

    def append_events(
        self, batches: list[tuple[str, list[StoredEvent]]], summaries: dict[str, dict[str, int]]
    ) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.pending.append(d)
        ids = [update_id for update_id, _ in batches]

        def write(_: None) -> None:
            if self.bad & set(ids):
                raise NotFound("Not Found: update not found")
            self.written.extend(ids)

        return d.addCallback(write)

    def release(self) -> None:
        while self.pending:
            self.pending.pop(0).callback(None)


def test_2_one_updates_bad_events_fail_only_its_own_request() -> None:
    store = _FlakyStore(bad={"gone"})
    writer = EventWriter(store)  # type: ignore[arg-type]
    event = [StoredEvent(1, b"{}")]
    first = Deferred.fromCoroutine(writer.add("a", event, None))
    # While the first commit is in flight, three requests queue up: one group commit.
    grouped = [Deferred.fromCoroutine(writer.add(u, event, None)) for u in ("b", "gone", "c")]
    store.release()  # the first write, then the group (which fails), then each alone
    store.release()
    store.release()
    _sync.successResultOf(first)
    _sync.successResultOf(grouped[0])
    _sync.failureResultOf(grouped[1], NotFound)
    _sync.successResultOf(grouped[2])
    assert store.written == ["a", "b", "c"]
    # The writer is not stuck: the next request is written as usual.
    later = Deferred.fromCoroutine(writer.add("d", event, None))
    store.release()
    _sync.successResultOf(later)
    assert store.written[-1] == "d"


def test_2_events_of_a_force_deleted_stack_touch_no_other_stack(env: Env) -> None:
    doomed, other = env.create("doomed"), env.create("other")
    a, b = env.start(doomed), env.start(other)
    assert a.token and b.token
    ok(env.backend.post_events(doomed, a.id, a.token, {"events": [{"sequence": 1}]}))
    ok(env.backend.delete_stack(doomed, True))
    fails(env.backend.post_events(doomed, a.id, a.token, {"events": [{"sequence": 2}]}), NotFound)
    ok(env.backend.post_events(other, b.id, b.token, {"events": [{"sequence": 2**63 - 1}]}))
    ok(env.backend.complete(other, b.id, b.token, "succeeded"))
    events, _token = ok(env.backend.get_events(other, b.id, None))
    assert [e.sequence for e in events] == [2**63 - 1]


def test_2_a_failing_expiry_does_not_stop_the_sweep(env: Env, logged: list[LogEvent]) -> None:
    first, second = env.create("first"), env.create("second")
    u1, u2 = env.start(first), env.start(second)
    env.clock.advance(61)
    real_finish = env.backend.inflight.finish

    async def finish(update: UpdateRecord) -> Any:
        if update.id == u1.id:
            raise Unavailable("Service Unavailable: injected")
        return await real_finish(update)

    env.backend.inflight.finish = finish  # type: ignore[method-assign]
    assert ok(env.backend.expire_leases()) == [u2.id]
    assert env.status(u1.id) == "running" and env.status(u2.id) == "failed"
    assert any(e.get("update_id") == u1.id and e["log_level"].name == "error" for e in logged)
    # The next sweep, with storage back, ends the first one too.
    env.backend.inflight.finish = real_finish  # type: ignore[method-assign]
    assert ok(env.backend.expire_leases()) == [u1.id]
    assert record(env, u1.id).failure == "the update's lease expired: its CLI stopped renewing it"


# -- 3: what is acknowledged can be read back and built ------------------------------------


NON_STANDARD = [
    b'{"version":3,"deployment":{"resources":[{"n":NaN}]}}',
    b'{"version":3,"deployment":{"resources":[{"n":Infinity}]}}',
    b'{"version":3,"deployment":{"resources":[{"n":-Infinity}]}}',
    b'{"version":3,"deployment":{"resources":[{"n":1e400}]}}',
    b'{"version":3,"deployment":{"resources":[{"s":"\\ud800"}]}}',
    b'{"version":3,"deployment":{"resources":[{"s":"\xff"}]}}',
    b'\xef\xbb\xbf{"version":3,"deployment":{}}',
    b'{"version":3,"deployment":{"resources":' + b"[" * 300 + b"]" * 300 + b"}}",
    b"[" * 200_000 + b"]" * 200_000,
]


@pytest.mark.parametrize("body", NON_STANDARD, ids=range(len(NON_STANDARD)))
def test_3_non_standard_json_is_refused_by_import_and_checkpoints(env: Env, body: bytes) -> None:
    ref = env.create()
    fails(env.backend.import_state(ref, body), BadRequest)
    update = env.start(ref)
    assert update.token
    fails(env.backend.checkpoint(ref, update.id, update.token, body), BadRequest)
    wrapped = b'{"version":3,"untypedDeployment":' + body + b',"sequenceNumber":1}'
    fails(env.backend.checkpoint_verbatim(ref, update.id, update.token, wrapped), BadRequest)
    # Nothing was stored: the stack renames, completes and exports as before.
    ok(env.backend.complete(ref, update.id, update.token, "succeeded"))
    ok(env.backend.rename_stack(ref, "", "renamed"))
    assert urns(exported(env, env.ref("renamed"))) == []


def test_3_sequence_numbers_past_the_integer_range_are_a_400(env: Env) -> None:
    ref = env.create()
    update = env.start(ref)
    assert update.token
    for sequence in ("100000000000000000000", "1e20", "9223372036854775808", "-1", "true"):
        body = (
            '{"version":3,"untypedDeployment":{"version":3,"deployment":{}},'
            f'"sequenceNumber":{sequence}}}'
        ).encode()
        fails(env.backend.checkpoint_verbatim(ref, update.id, update.token, body), BadRequest)
    ok(env.backend.complete(ref, update.id, update.token, "succeeded"))


def test_3_a_delta_whose_hash_matches_but_is_not_a_state_is_refused(env: Env) -> None:
    ref, update, token = _delta_update(env)
    baseline = json.loads(verbatim(1))["untypedDeployment"]
    text = json.dumps(baseline, separators=(",", ":")).encode()
    for result in (b'{"version":3,"deployment":{"n":NaN}}', b"not json", b"[1,2]"):
        import hashlib

        body = {
            "version": 3,
            "checkpointHash": hashlib.sha256(result).hexdigest(),
            "sequenceNumber": 2,
            "deploymentDelta": [
                {
                    "Span": {"start": {"offset": 0}, "end": {"offset": len(text)}},
                    "NewText": result.decode(),
                }
            ],
        }
        raw = json.dumps(body).encode()
        fails(env.backend.checkpoint_delta(ref, update.id, token, raw, raw), BadRequest)
    ok(env.backend.checkpoint_delta(ref, update.id, token, delta(2), delta(2)))
    ok(env.backend.complete(ref, update.id, token, "succeeded"))
    assert (
        urns(exported(env, ref))[-1]
        == "urn:pulumi:dev::demo::random:index/randomPet:RandomPet::pet"
    )


def test_3_journal_entries_whose_aliases_collide_are_refused_on_arrival(env: Env) -> None:
    ref, update, token = _journaling(env)
    first = entries_body(*created(1, 1, item("a"), aliases=[item("old")]))
    ok(env.backend.journal_entries(ref, update.id, token, first, first))
    clash = entries_body(*created(3, 2, item("b"), aliases=[item("old")]))
    error = fails(env.backend.journal_entries(ref, update.id, token, clash, clash), BadRequest)
    assert "alias" in error.message
    # The refused batch left no trace; a good batch after it applies, and the update ends.
    good = entries_body(*created(3, 2, item("b")))
    ok(env.backend.journal_entries(ref, update.id, token, good, good))
    ok(env.backend.complete(ref, update.id, token, "succeeded"))
    assert urns(exported(env, ref)) == [item("a"), item("b")]
    assert record(env, update.id).status == "succeeded"


# -- 4: a state that cannot be built ends the update, not the stack ------------------------


def _break_materialising(env: Env) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("injected: cannot build")

    env.backend.inflight._generate_blocking = broken  # type: ignore[method-assign]


@pytest.mark.parametrize("how", ["complete", "cancel", "expire", "takeover", "import"])
def test_4_failure_at_the_end_keeps_the_last_good_state_and_frees_the_stack(
    env: Env, how: str
) -> None:
    ref, first, token = _journaling(env)
    body = journal_batch()
    ok(env.backend.journal_entries(ref, first.id, token, body, body))
    ok(env.backend.complete(ref, first.id, token, "succeeded"))
    good = exported(env, ref)
    assert urns(good) == [STACK]

    update_id = ok(env.backend.create_update(ref, "update", {"options": {}}))
    second: UpdateRecord = ok(env.backend.start_update(ref, update_id, {"journalVersion": 1}))
    assert second.token
    more = entries_body(*created(1, 1, item("x")))
    ok(env.backend.journal_entries(ref, second.id, second.token, more, more))
    _break_materialising(env)
    if how == "complete":
        error = fails(env.backend.complete(ref, second.id, second.token, "succeeded"), BadRequest)
        assert "could not be built" in error.message
    elif how == "cancel":
        ok(env.backend.cancel(ref, second.id))
    elif how == "expire":
        env.clock.advance(61)
        assert ok(env.backend.expire_leases()) == [second.id]
    elif how == "takeover":
        env.clock.advance(61)
        env.start(ref)
    else:
        env.clock.advance(61)
        ok(env.backend.import_state(ref, deployment_body()))
    ended = record(env, second.id)
    assert ended.status in ("failed", "cancelled")
    assert ended.failure and "could not be built" in ended.failure
    stack = ok(env.backend.stack(ref))
    if how in ("complete", "cancel", "expire"):
        assert stack.locked_by is None
        # Version N keeps what it held at start: the last good state.
        kept = exported(env, ref)
        assert kept["deployment"]["resources"] == good["deployment"]["resources"]
    assert second.id not in env.backend.inflight.journals


# -- 5: writes of an update's state are monotonic -------------------------------------------


def test_5_a_late_verbatim_retry_does_not_roll_the_state_back(env: Env) -> None:
    ref, update, token = _delta_update(env)  # verbatim sequence 1: one resource
    ok(env.backend.checkpoint_delta(ref, update.id, token, delta(2), delta(2)))  # two
    assert len(urns(exported(env, ref))) == 2
    # The slow retry of sequence 1 arrives last: acknowledged (204) and ignored.
    ok(env.backend.checkpoint_verbatim(ref, update.id, token, verbatim(1)))
    assert len(urns(exported(env, ref))) == 2
    ok(env.backend.complete(ref, update.id, token, "succeeded"))
    assert len(urns(exported(env, ref))) == 2


def test_5_a_journaling_update_refuses_checkpoints(env: Env) -> None:
    ref, update, token = _journaling(env)
    body = journal_batch()
    ok(env.backend.journal_entries(ref, update.id, token, body, body))
    fails(env.backend.checkpoint(ref, update.id, token, deployment_body()), Conflict)
    fails(env.backend.checkpoint_verbatim(ref, update.id, token, verbatim(5)), Conflict)
    ok(env.backend.complete(ref, update.id, token, "succeeded"))
    assert urns(exported(env, ref)) == [STACK]


# -- 6: memory is bounded, and freed on every path that ends an update -----------------------


def test_6_cost_lru_evicts_by_cost_and_keeps_the_newest() -> None:
    cache: CostLRU[bytes] = CostLRU(10, len)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # a is now the most recent
    cache.put("c", b"1234")
    assert "b" not in cache and "a" in cache and "c" in cache and cache.total == 8
    cache.put("big", b"x" * 50)  # over budget alone: kept, everything else goes
    assert len(cache) == 1 and cache.total == 50
    cache.pop("big")
    assert cache.total == 0


def test_6_replayers_are_bounded_and_rebuilt_on_a_miss(env: Env) -> None:
    env.backend.inflight = InFlight(env.store, env.backend.cpu, env.clock, 1 << 30, budget=2 * 1024)
    updates = []
    for n in range(12):
        ref = env.create(f"s{n}")
        update_id = ok(env.backend.create_update(ref, "update", {"options": {}}))
        update: UpdateRecord = ok(env.backend.start_update(ref, update_id, {"journalVersion": 1}))
        assert update.token
        updates.append((ref, update, update.token))
    for round_ in range(3):
        for n, (ref, update, token) in enumerate(updates):
            body = entries_body(*created(1 + 2 * round_, round_ + 1, item(f"{n}-{round_}")))
            ok(env.backend.journal_entries(ref, update.id, token, body, body))
    journals = env.backend.inflight.journals
    assert journals.total <= journals.budget or len(journals) == 1
    assert len(journals) < len(updates)
    for n, (ref, update, token) in enumerate(updates):
        ok(env.backend.complete(ref, update.id, token, "succeeded"))
        assert sorted(urns(exported(env, ref))) == sorted(item(f"{n}-{r}") for r in range(3))
    assert len(journals) == 0 and journals.total == 0


def test_6_nine_delta_updates_do_not_thrash_the_baseline_cache(env: Env) -> None:
    rebuilds = 0
    real = InFlight._rebuild_baseline_blocking

    def counting(self: InFlight, *args: Any) -> Any:
        nonlocal rebuilds
        rebuilds += 1
        return real(self, *args)

    InFlight._rebuild_baseline_blocking = counting  # type: ignore[method-assign,assignment]
    try:
        updates = []
        for n in range(9):
            ref = env.create(f"d{n}")
            update = env.start(ref)
            assert update.token
            ok(env.backend.checkpoint_verbatim(ref, update.id, update.token, verbatim(1)))
            updates.append((ref, update, update.token))
        for ref, update, token in updates:
            ok(env.backend.checkpoint_delta(ref, update.id, token, delta(2), delta(2)))
        assert rebuilds == 0
    finally:
        InFlight._rebuild_baseline_blocking = real  # type: ignore[method-assign]


def test_6_force_delete_and_import_takeover_free_the_replayer(env: Env) -> None:
    ref, update, token = _journaling(env)
    body = journal_batch()
    ok(env.backend.journal_entries(ref, update.id, token, body, body))
    assert update.id in env.backend.inflight.journals
    ok(env.backend.delete_stack(ref, True))
    assert update.id not in env.backend.inflight.journals

    ref, update, token = _journaling(env)
    ok(env.backend.journal_entries(ref, update.id, token, body, body))
    env.clock.advance(61)
    # The import takes the stack over from the dead CLI: its journaled progress is kept
    # in version N (then superseded by the import), and its replayer is freed.
    ok(env.backend.import_state(ref, deployment_body()))
    ended = record(env, update.id)
    assert ended.status == "failed" and update.id not in env.backend.inflight.journals
    assert urns(exported(env, ref, ended.version)) == [STACK]


# -- 7: nothing proportional to a state runs on the reactor --------------------------------


class _RecordingRunner(InlineRunner):
    def __init__(self) -> None:
        self.names: list[str] = []

    def run(self, f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        self.names.append(getattr(f, "__name__", repr(f)))
        return super().run(f, *args, **kwargs)


def test_7_journal_batches_are_applied_on_the_cpu_pool(env: Env) -> None:
    cpu = _RecordingRunner()
    env.backend.inflight = InFlight(env.store, cpu, env.clock, 1 << 30)
    ref, update, token = _journaling(env)
    body = journal_batch()
    ok(env.backend.journal_entries(ref, update.id, token, body, body))
    # A small batch is cheaper to apply than a trip to the pool; the replay state is built
    # there all the same (it is as big as the stack).
    assert "_apply_blocking" not in cpu.names and "_rebuild_blocking" in cpu.names
    assert len(body) < INLINE_JOURNAL
    calls = []
    real_add = JournalReplayer.add

    def add(self: JournalReplayer, entries: Any, *, check: bool = False) -> None:
        calls.append(check)
        real_add(self, entries, check=check)

    JournalReplayer.add = add  # type: ignore[method-assign]
    try:
        more = entries_body(*created(4, 3, item("z"), payload="x" * INLINE_JOURNAL))
        before = len(cpu.names)
        ok(env.backend.journal_entries(ref, update.id, token, more, more))
        # The only replay work of a large batch went through the CPU runner.
        assert cpu.names[before:].count("_apply_blocking") == 1 and calls == [True]
        # So does a small one whose entry makes the replay walk the whole state.
        rebuilt = entries_body({"version": 1, "kind": 7, "sequenceID": 6, "operationID": 0})
        before = len(cpu.names)
        ok(env.backend.journal_entries(ref, update.id, token, rebuilt, rebuilt))
        assert cpu.names[before:].count("_apply_blocking") == 1 and calls == [True, True]
    finally:
        JournalReplayer.add = real_add  # type: ignore[method-assign]


# -- 10: retention --------------------------------------------------------------------------


def test_10_retention_removes_old_events_previews_and_unstarted_updates(env: Env) -> None:
    ref = env.create()
    old = env.start(ref)
    preview = env.start(ref, dry_run=True)
    assert old.token and preview.token
    ok(env.backend.post_events(ref, old.id, old.token, {"events": [{"sequence": 1}]}))
    ok(env.backend.complete(ref, old.id, old.token, "succeeded"))
    ok(env.backend.complete(ref, preview.id, preview.token, "succeeded"))
    abandoned = ok(env.backend.create_update(ref, "update", {"options": {}}))
    env.clock.advance(29 * DAY)
    assert ok(env.backend.apply_retention()) == {
        "events": 0,
        "previews": 0,
        "updates": 0,
        "unstarted": 1,
        "claims": 0,
        "tokens": 0,
        "audit": 0,
    }
    env.clock.advance(2 * DAY)  # previews: 30 days
    assert ok(env.backend.apply_retention())["previews"] == 1
    env.clock.advance(60 * DAY)  # events: 90 days; updates are kept forever by default
    assert ok(env.backend.apply_retention())["events"] == 1
    assert [u.id for u in ok(env.backend.history(ref, 0, 1))] == [old.id]
    assert _sync.successResultOf(env.store.get_update(abandoned)) is None
    assert _sync.successResultOf(env.store.get_update(preview.id)) is None


def test_10_update_retention_keeps_the_update_of_the_current_version(tmp_path: Path) -> None:
    env = _env(tmp_path, update_retention_days=10.0)
    try:
        ref = env.create()
        ids = []
        for _ in range(3):
            update = env.start(ref)
            assert update.token
            ok(env.backend.complete(ref, update.id, update.token, "succeeded"))
            ids.append(update.id)
        env.clock.advance(11 * DAY)
        assert ok(env.backend.apply_retention())["updates"] == 2
        assert [u.id for u in ok(env.backend.history(ref, 0, 1))] == [ids[-1]]
    finally:
        env.store.close()


def test_gzip_of_a_stored_state_is_still_exported(env: Env) -> None:
    """Guard for the tests above: export returns what import stored."""
    ref = env.create()
    ok(env.backend.import_state(ref, deployment_body([{"urn": PET, "type": "t", "custom": True}])))
    blob = ok(env.backend.export(ref, None))
    assert json.loads(gzip.decompress(blob.gzipped))["deployment"]["resources"][0]["urn"] == PET
    assert deployments.MAX_DEPTH == 250


def _delta_between(old: bytes, new: bytes, sequence: int) -> bytes:
    import hashlib

    edit = {"Span": {"start": {"offset": 0}, "end": {"offset": len(old)}}, "NewText": new.decode()}
    body = {
        "version": 3,
        "checkpointHash": hashlib.sha256(new).hexdigest(),
        "sequenceNumber": sequence,
        "deploymentDelta": [edit],
    }
    return json.dumps(body).encode()


def test_6_deltas_are_compacted_once_they_outweigh_the_state(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pulumid.engine import inflight

    monkeypatch.setattr(inflight, "COMPACT_AFTER", 2000)
    ref, update, token = _delta_update(env)
    texts = [
        json.dumps(
            {"version": 3, "deployment": {"resources": [{"urn": f"u{i}", "type": "t"}]}}
        ).encode()
        for i in range(2)
    ]
    first = json.loads(verbatim(1))["untypedDeployment"]
    current = json.dumps(first, separators=(",", ":")).encode()
    stored_sizes = []
    for sequence in range(2, 30):
        new = texts[sequence % 2] + b" " * (sequence * 10)
        body = _delta_between(current, new, sequence)
        ok(env.backend.checkpoint_delta(ref, update.id, token, body, body))
        current = new
        stored_sizes.append(
            sum(len(b) for _s, b in _sync.successResultOf(env.store.get_deltas(update.id)))
        )
    # Stored deltas never add up to much more than the compaction threshold.
    assert max(stored_sizes) <= 2000 + 1000 and 0 in stored_sizes
    assert urns(exported(env, ref)) == ["u1"]
    env.backend.inflight = InFlight(env.store, env.backend.cpu, env.clock, 1 << 30)  # restart
    assert urns(exported(env, ref)) == ["u1"]
    ok(env.backend.complete(ref, update.id, token, "succeeded"))
    assert urns(exported(env, ref)) == ["u1"]
    assert record(env, update.id).checkpoint_seq == 29


def test_6_reading_a_delta_update_does_not_load_its_deltas(env: Env) -> None:
    ref, update, token = _delta_update(env)
    ok(env.backend.checkpoint_delta(ref, update.id, token, delta(2), delta(2)))
    loads = []
    real = env.store.get_deltas

    def counting(update_id: str) -> Any:
        loads.append(update_id)
        return real(update_id)

    env.store.get_deltas = counting  # type: ignore[method-assign]
    assert len(urns(exported(env, ref))) == 2
    ok(env.backend.complete(ref, update.id, token, "succeeded"))
    assert loads == []  # the cached baseline serves; has_deltas answers the rest


# -- toward stateless nodes (issue 14): caches are checked against the store ---------------


def _second_node(env: Env) -> Any:
    """Another daemon's engine on the same store: its own in-memory caches. The store stands
    for a shared one (PostgreSQL), which no node has to itself."""
    from pulumid.engine.backend import Backend

    env.store.exclusive = False
    b = env.backend
    inflight = InFlight(env.store, b.cpu, env.clock, 1 << 30)
    return Backend(b.config, env.store, env.clock, b.cpu, b.secrets, b.events, inflight)


def test_journal_batches_alternating_between_two_nodes_all_land(env: Env) -> None:
    other = _second_node(env)
    ref, update, token = _journaling(env)
    nodes = [env.backend, other]
    for n in range(6):
        body = entries_body(*created(1 + 2 * n, n + 1, item(f"n{n}")))
        ok(nodes[n % 2].journal_entries(ref, update.id, token, body, body))
    # Each node's read sees the other's batches, whatever its cache held.
    expected = sorted(item(f"n{n}") for n in range(6))
    for node in nodes:
        blob = ok(node.export(ref, None))
        assert sorted(urns(json.loads(gzip.decompress(blob.gzipped)))) == expected
    # A batch that refers to an operation only the other node has seen is valid.
    begin = {"version": 1, "kind": 0, "sequenceID": 13, "operationID": 99}
    ok(env.backend.journal_entries(ref, update.id, token, entries_body(begin), entries_body(begin)))
    end = {"version": 1, "kind": 2, "sequenceID": 14, "operationID": 99}
    ok(other.journal_entries(ref, update.id, token, entries_body(end), entries_body(end)))
    assert _sync.successResultOf(env.store.journal_length(update.id)) == 8
    ok(env.backend.complete(ref, update.id, token, "succeeded"))
    assert sorted(urns(exported(env, ref))) == expected


def test_a_node_whose_append_lost_the_race_rebuilds_and_retries(env: Env) -> None:
    other = _second_node(env)
    ref, update, token = _journaling(env)
    first = entries_body(*created(1, 1, item("a")))
    ok(env.backend.journal_entries(ref, update.id, token, first, first))
    ok(other.journal_entries(ref, update.id, token, first, first))  # a retry, via node B
    second = entries_body(*created(3, 2, item("b")))
    ok(other.journal_entries(ref, update.id, token, second, second))
    # Node A's replayer holds one batch, the store three: its append is refused (Stale),
    # it rebuilds and applies again, and nothing is applied twice.
    third = entries_body(*created(5, 3, item("c")))
    ok(env.backend.journal_entries(ref, update.id, token, third, third))
    assert env.backend.inflight.journals.get(update.id).batches == 4  # type: ignore[union-attr]
    ok(other.complete(ref, update.id, token, "succeeded"))
    assert urns(exported(env, ref)) == [item("a"), item("b"), item("c")]


def test_delta_baselines_follow_saves_made_by_another_node(env: Env) -> None:
    other = _second_node(env)
    ref, update, token = _delta_update(env)  # node A holds the verbatim baseline
    ok(other.checkpoint_delta(ref, update.id, token, delta(2), delta(2)))  # B applies it
    # Node A's cached baseline (sequence 1) is behind the store's (2): it rebuilds.
    blob = ok(env.backend.export(ref, None))
    assert len(urns(json.loads(gzip.decompress(blob.gzipped)))) == 2
    ok(env.backend.complete(ref, update.id, token, "succeeded"))
    assert len(urns(exported(env, ref))) == 2


def test_two_nodes_sweeping_at_once_expire_each_lease_once(env: Env) -> None:
    other = _second_node(env)
    ref = env.create()
    update = env.start(ref)
    env.clock.advance(env.backend.config.lease_ttl + 1)
    built: list[str] = []
    for node in (env.backend, other):
        real = node._final_state

        def counting(record: UpdateRecord, real: Any = real) -> Any:
            built.append(record.id)
            return real(record)

        node._final_state = counting  # type: ignore[method-assign]
    # Both nodes find the lease expired; the first claims it, the second skips it.
    assert ok(env.backend.expire_leases()) == [update.id]
    assert ok(other.expire_leases()) == []
    assert built == [update.id]
    assert record(env, update.id).status == "failed"


def test_two_nodes_prune_once_per_interval(env: Env) -> None:
    other = _second_node(env)
    ref = env.create()
    ok(env.backend.create_update(ref, "update", {"options": {}}))
    env.clock.advance(2 * DAY)
    assert ok(env.backend.apply_retention())["unstarted"] == 1
    # The other node's tick in the same interval finds the claim live and does nothing.
    assert ok(other.apply_retention()) == {}
    env.clock.advance(env.backend.config.retention_interval)
    assert ok(other.apply_retention())["unstarted"] == 0


def test_alternating_nodes_read_only_the_batches_they_missed(env: Env) -> None:
    """Behind round robin each node is one batch behind: it reads that one, not the journal."""
    other = _second_node(env)
    ref, update, token = _journaling(env)
    reads: list[tuple[str, int]] = []
    real = env.store.get_journal

    def counting(update_id: str, after: int = 0) -> Any:
        reads.append((update_id, after))
        return real(update_id, after=after)

    env.store.get_journal = counting  # type: ignore[method-assign]
    nodes = [env.backend, other]
    for n in range(10):
        body = entries_body(*created(1 + 2 * n, n + 1, item(f"n{n}")))
        ok(nodes[n % 2].journal_entries(ref, update.id, token, body, body))
    # Each node built its replayer once (from batch 0) and then caught up one batch at a time.
    assert reads == [(update.id, after) for after in (0, 0, 1, 2, 3, 4, 5, 6, 7, 8)]
    ok(other.complete(ref, update.id, token, "succeeded"))
    assert sorted(urns(exported(env, ref))) == sorted(item(f"n{n}") for n in range(10))
