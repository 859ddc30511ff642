"""Delta checkpoints and journal entries through the Backend: in memory, stored, rebuilt."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred

from pulumid.engine import deployments
from pulumid.engine.inflight import InFlight
from pulumid.errors import BadRequest
from pulumid.storage.records import StackRef, UpdateRecord
from tests.engine.test_backend import Env, _env, _sync, exported, fails, ok

T = TypeVar("T")

# The worked example of the protocol reference (§5.5): offsets and hashes computed there.
BASELINE = (
    '{"version":3,"deployment":{"manifest":{"time":"2024-05-01T10:00:00Z","magic":"",'
    '"version":""},"metadata":{},"resources":[{"urn":"urn:pulumi:dev::demo::pulumi:pulumi:'
    'Stack::demo-dev","custom":false,"type":"pulumi:pulumi:Stack"}]}}'
)
BASELINE_SHA = "df07c35b906204cb36094e55fe548dc1de7ca752666f501fb2c6f2bf9fe78094"
NEW_TEXT = (
    '{"urn":"urn:pulumi:dev::demo::pulumi:pulumi:Stack::demo-dev","custom":false,'
    '"type":"pulumi:pulumi:Stack"},{"urn":"urn:pulumi:dev::demo::random:index/randomPet:'
    'RandomPet::pet","custom":true,"id":"able-cat","type":"random:index/randomPet:RandomPet"}'
)
RESULT_SHA = "60b55e4940d86e77282c61c12bf2b2e6825d9729c110915b63f72572a99f8acc"


def verbatim(sequence: int) -> bytes:
    return (f'{{"version":3,"untypedDeployment":{BASELINE},"sequenceNumber":{sequence}}}').encode()


def delta(sequence: int, sha: str = RESULT_SHA) -> bytes:
    edit = {
        "Span": {
            "uri": "",
            "start": {"line": 1, "column": 1, "offset": 121},
            "end": {"line": 1, "column": 1, "offset": 226},
        },
        "NewText": NEW_TEXT,
    }
    body = {
        "version": 3,
        "checkpointHash": sha,
        "sequenceNumber": sequence,
        "deploymentDelta": [edit],
    }
    return json.dumps(body).encode()


def done(d: Deferred[T]) -> T:
    return _sync.successResultOf(d)


@pytest.fixture
def env(tmp_path: Path) -> Any:
    e = _env(tmp_path)
    yield e
    e.store.close()


def restarted(env: Env) -> None:
    """Forget everything in memory, as a daemon restart does."""
    backend = env.backend
    backend.inflight = InFlight(backend.store, backend.cpu, backend.clock, 1 << 30)


def urns(document: dict[str, Any]) -> list[str]:
    return [r["urn"] for r in document["deployment"].get("resources") or []]


def test_the_reference_example_hashes() -> None:
    assert hashlib.sha256(BASELINE.encode()).hexdigest() == BASELINE_SHA
    applied = deployments.apply_delta_blocking(BASELINE.encode(), 1, delta(2))
    assert applied is not None
    assert applied[0] == 2 and hashlib.sha256(applied[1]).hexdigest() == RESULT_SHA


def _delta_update(env: Env) -> tuple[StackRef, UpdateRecord, str]:
    ref = env.create()
    update = env.start(ref)
    assert update.token
    ok(env.backend.checkpoint_verbatim(ref, update.id, update.token, verbatim(1)))
    return ref, update, update.token


def test_delta_applies_and_export_sees_it_before_complete(env: Env) -> None:
    ref, update, token = _delta_update(env)
    ok(env.backend.checkpoint_delta(ref, update.id, token, b"wire", delta(2)))
    blob = ok(env.backend.export(ref, None))
    text = deployments.gunzip_blocking(blob.gzipped, 1 << 20)
    assert hashlib.sha256(text).hexdigest() == RESULT_SHA
    # A retried delta (same sequence, same hash) changes nothing.
    ok(env.backend.checkpoint_delta(ref, update.id, token, b"wire", delta(2)))
    ok(env.backend.complete(ref, update.id, token, "succeeded"))
    assert urns(exported(env, ref))[-1].endswith("::pet")
    assert done(env.store.get_deltas(update.id)) == []


def test_a_wrong_hash_is_a_400_and_keeps_the_baseline(env: Env) -> None:
    ref, update, token = _delta_update(env)
    fails(env.backend.checkpoint_delta(ref, update.id, token, b"x", delta(2, "0" * 64)), BadRequest)
    # The CLI falls back to a verbatim checkpoint with the same sequence number.
    ok(env.backend.checkpoint_verbatim(ref, update.id, token, verbatim(2)))
    ok(env.backend.checkpoint_delta(ref, update.id, token, b"wire", delta(3)))
    ok(env.backend.complete(ref, update.id, token, "succeeded"))
    assert len(urns(exported(env, ref))) == 2


def test_deltas_survive_a_restart(env: Env) -> None:
    ref, update, token = _delta_update(env)
    ok(env.backend.checkpoint_delta(ref, update.id, token, delta(2), delta(2)))
    restarted(env)
    # The baseline is rebuilt from version N and the stored delta bodies.
    assert len(urns(exported(env, ref))) == 2
    ok(env.backend.complete(ref, update.id, token, "failed"))
    assert len(urns(exported(env, ref))) == 2


STACK = "urn:pulumi:dev::web::pulumi:pulumi:Stack::web-dev"
PET = "urn:pulumi:dev::web::random:index/randomPet:RandomPet::pet"


def journal_batch() -> bytes:
    entries = [
        {"version": 1, "kind": 0, "sequenceID": 1, "operationID": 1,
         "removeOld": None, "removeNew": None},
        {"version": 1, "kind": 1, "sequenceID": 2, "operationID": 1,
         "removeOld": None, "removeNew": None,
         "state": {"urn": STACK, "custom": False, "type": "pulumi:pulumi:Stack"}},
        {"version": 1, "kind": 0, "sequenceID": 3, "operationID": 2,
         "removeOld": None, "removeNew": None,
         "operation": {"resource": {"urn": PET, "custom": True,
                                    "type": "random:index/randomPet:RandomPet"},
                       "type": "creating"}},
    ]  # fmt: skip
    return json.dumps({"entries": entries}).encode()


def _journaling(env: Env) -> tuple[StackRef, UpdateRecord, str]:
    ref = env.create()
    update_id = ok(env.backend.create_update(ref, "update", {"options": {}}))
    update: UpdateRecord = ok(
        env.backend.start_update(ref, update_id, {"journalVersion": 1}, "v3.259.0")
    )
    assert update.journal_version == 1 and update.token
    return ref, update, update.token


def test_journal_replayed_for_export_and_after_a_restart(env: Env) -> None:
    ref, update, token = _journaling(env)
    body = journal_batch()
    ok(env.backend.journal_entries(ref, update.id, token, body, body))
    live = exported(env, ref)
    assert urns(live) == [STACK]
    [pending] = live["deployment"]["pending_operations"]
    assert pending["resource"]["urn"] == PET and pending["type"] == "creating"
    manifest = live["deployment"]["manifest"]
    assert manifest["version"] == "v3.259.0"
    assert manifest["magic"] == hashlib.sha256(b"v3.259.0").hexdigest()
    restarted(env)
    assert exported(env, ref)["deployment"]["resources"] == live["deployment"]["resources"]
    # Cancelled mid-create: the open create stays a pending operation in the stored state.
    ok(env.backend.cancel(ref, update.id))
    assert exported(env, ref)["deployment"]["pending_operations"] == [pending]
    assert done(env.store.get_journal(update.id)) == []


def test_an_update_with_nothing_journaled_exports_version_n_as_stored(env: Env) -> None:
    # The CLI reads its base as an update starts: that is version N, byte for byte, and no
    # replay state is built for it.
    ref, update, token = _journaling(env)
    ok(env.backend.journal_entries(ref, update.id, token, journal_batch(), journal_batch()))
    ok(env.backend.complete(ref, update.id, token, "succeeded"))
    stored = ok(env.backend.export(ref, 1))
    second = ok(env.backend.create_update(ref, "update", {"options": {}}))
    started = ok(env.backend.start_update(ref, second, {"journalVersion": 1}, "v3.259.0"))
    assert ok(env.backend.export(ref, None)) == stored
    assert started.id not in env.backend.inflight.journals
    # Once something is journaled, the export is the replay's.
    creating = {
        "resource": {"urn": PET, "custom": True, "type": "random:index/randomPet:RandomPet"},
        "type": "creating",
    }
    batch = json.dumps(
        {
            "entries": [
                {"version": 1, "kind": 0, "sequenceID": 1, "operationID": 1, "operation": creating}
            ]
        }
    ).encode()
    ok(env.backend.journal_entries(ref, second, started.token, batch, batch))
    assert started.id in env.backend.inflight.journals
    live = exported(env, ref)
    # The open create comes first; the first update's interrupted create stays after it.
    assert urns(live) == [STACK] and live["deployment"]["pending_operations"] == [creating] * 2


def test_a_bad_journal_entry_is_a_400_and_loses_nothing(env: Env) -> None:
    ref, update, token = _journaling(env)
    body = journal_batch()
    ok(env.backend.journal_entries(ref, update.id, token, body, body))
    bad = json.dumps(
        {
            "entries": [
                {
                    "version": 1,
                    "kind": 1,
                    "sequenceID": 4,
                    "operationID": 9,
                    "removeOld": 99,
                    "removeNew": None,
                }
            ]
        }
    )
    fails(env.backend.journal_entries(ref, update.id, token, bad.encode(), bad.encode()),
          BadRequest)  # fmt: skip
    assert urns(exported(env, ref)) == [STACK]
    assert len(done(env.store.get_journal(update.id))) == 1


def test_journaling_only_when_the_cli_asks(env: Env) -> None:
    ref = env.create()
    update_id = ok(env.backend.create_update(ref, "update", {"options": {}}))
    update: UpdateRecord = ok(env.backend.start_update(ref, update_id, {}))
    assert update.journal_version == 0
    assert update.token
    body = journal_batch()
    fails(env.backend.journal_entries(ref, update.id, update.token, body, body), BadRequest)
