"""What only a split store (metadata + object storage) has to get right: blobs are durable before
the row that names them, rows hold references, orphans are collected and nothing else is.

Runs on SQLite and PostgreSQL metadata, with blobs in a real MinIO.
"""

from __future__ import annotations

import gzip
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pulumid.errors import BadRequest, Unavailable
from pulumid.storage.blobs import S3Blobs
from pulumid.storage.interface import Store
from pulumid.storage.records import StateBlob
from pulumid.storage.split import GRACE_SECONDS, REF, BlobbedStore, key_time
from pulumid.threads import InlineRunner
from tests.contract.test_store import (
    IMPLEMENTATIONS,
    NOW,
    _Postgres,
    blob,
    fails,
    journaling,
    make_stack,
    ok,
    started,
    state_text,
)
from tests.minio import s3_url

pytestmark = pytest.mark.live


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def meta_opener(request: pytest.FixtureRequest) -> Callable[[Path], Store]:
    if request.param == "postgres":
        _Postgres.server = request.getfixturevalue("postgres_server")
    return IMPLEMENTATIONS[request.param]


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def split(
    meta_opener: Callable[[Path], Store], tmp_path: Path, minio_endpoint: str, clock: Clock
) -> Iterator[BlobbedStore]:
    blobs = S3Blobs.open(s3_url(minio_endpoint, f"split-{uuid.uuid4().hex}"), InlineRunner())
    store = BlobbedStore(meta_opener(tmp_path), blobs, clock=clock)
    try:
        yield store
    finally:
        store.close()


def keys(store: BlobbedStore) -> list[str]:
    found: list[str] = []
    for kind in ("states", "journal", "deltas"):
        listed: list[str] = ok(store.blobs.list_keys(kind + "/"))
        found.extend(listed)
    return found


def test_rows_hold_references_and_the_bytes_are_in_object_storage(
    split: BlobbedStore, clock: Clock
) -> None:
    stack = make_stack(split, initial=blob('{"v": 0}'))
    update = started(split, stack, now=NOW + 1)
    assert update.token_hash
    big = '{"resources": "' + "x" * 100_000 + '"}'
    clock.now = NOW + 2.5  # the time in a key is the split store's clock at the put
    assert ok(split.save_checkpoint(update.id, update.token_hash, NOW + 2, blob(big, 1), 1))
    ok(split.complete_update(update.id, update.token_hash, NOW + 3, "succeeded", 0))

    stored = ok(split.meta.get_state(stack.id, None))
    assert stored is not None and stored.gzipped.startswith(REF)
    assert len(stored.gzipped) < 100  # the metadata row is small, whatever the state's size
    assert state_text(split, stack.id, None) == big
    key = stored.gzipped[len(REF) :].decode()
    assert key.startswith(f"states/{update.id}/")
    assert key_time(key) == NOW + 2.5
    assert key in keys(split)


def test_journal_and_deltas_round_trip_through_object_storage(split: BlobbedStore) -> None:
    stack = make_stack(split)
    update = journaling(split, stack)
    assert update.token_hash
    bodies = [gzip.compress(f"batch {n}".encode()) for n in range(20)]
    for body in bodies:
        ok(split.append_journal(update.id, update.token_hash, NOW + 1, body))
    assert ok(split.get_journal(update.id)) == bodies
    assert all(b.startswith(REF) for b in ok(split.meta.get_journal(update.id)))

    other = started(split, make_stack(split, "other"), now=NOW + 2)
    assert other.token_hash
    for seq in (1, 2, 3):
        ok(split.save_delta(other.id, other.token_hash, NOW + 3, seq, f"delta {seq}".encode()))
    assert ok(split.get_deltas(other.id)) == [(n, f"delta {n}".encode()) for n in (1, 2, 3)]


def test_ignored_and_refused_writes_leave_no_blob(split: BlobbedStore) -> None:
    stack = make_stack(split)
    update = started(split, stack, now=NOW + 1)
    assert update.token_hash
    assert ok(split.save_checkpoint(update.id, update.token_hash, NOW + 2, blob("{}"), 5))
    before = keys(split)
    # A sequence already stored is acknowledged and ignored: its blob goes at once.
    assert not ok(split.save_checkpoint(update.id, update.token_hash, NOW + 3, blob("{}"), 5))
    # A refused write (wrong token) leaves nothing either.
    fails(split.save_checkpoint(update.id, "wrong", NOW + 3, blob("{}"), 6), Exception)
    # A journal batch for an update that does not journal is refused.
    fails(split.append_journal(update.id, update.token_hash, NOW + 3, b"x"), BadRequest)
    assert keys(split) == before


def test_collect_takes_old_orphans_only(split: BlobbedStore, clock: Clock) -> None:
    stack = make_stack(split)
    update = started(split, stack, now=NOW + 1)
    assert update.token_hash
    assert ok(split.save_checkpoint(update.id, update.token_hash, NOW + 2, blob("{}"), 1))
    # Orphans as a crash between the put and the row leaves them: one old, one recent.
    ok(split.blobs.put(f"states/{update.id}/{int(NOW * 1000):013d}-0123456789abcdef", b"old"))
    recent = f"journal/{update.id}/{int((NOW + GRACE_SECONDS) * 1000):013d}-00000000000000ff"
    ok(split.blobs.put(recent, b"recent"))
    # Not ours (no time in the name): never touched.
    ok(split.blobs.put("states/foreign/readme", b"keep"))
    referenced = set(keys(split)) - {recent, "states/foreign/readme"}
    referenced = {k for k in referenced if not k.endswith("0123456789abcdef")}

    assert ok(split.collect(NOW + GRACE_SECONDS + 10)) == 1
    assert set(keys(split)) == referenced | {recent, "states/foreign/readme"}
    assert state_text(split, stack.id, None) == "{}"
    # Later, the recent one is old enough too; the referenced blob stays.
    assert ok(split.collect(NOW + 3 * GRACE_SECONDS)) == 1
    assert set(keys(split)) == referenced | {"states/foreign/readme"}
    assert state_text(split, stack.id, None) == "{}"


def test_blobs_of_deleted_rows_are_collected(split: BlobbedStore, clock: Clock) -> None:
    stack = make_stack(split, initial=blob('{"v": 0}'))
    assert len(keys(split)) == 1
    ok(split.delete_stack(stack.id, force=True))
    assert ok(split.collect(NOW + GRACE_SECONDS - 1)) == 0  # within the grace period
    assert ok(split.collect(NOW + GRACE_SECONDS + 1)) == 1
    assert keys(split) == []


def test_a_lost_blob_is_unavailable_not_an_empty_state(split: BlobbedStore) -> None:
    stack = make_stack(split, initial=blob('{"v": 0}'))
    ok(split.blobs.delete(keys(split)))
    error = fails(split.get_state(stack.id, None), Unavailable)
    assert "lost blob states/new/" in str(error)


def test_rows_written_inline_before_the_switch_stay_readable(split: BlobbedStore) -> None:
    # A database that kept its blobs inline, then got --blob-store s3://.
    stack = make_stack(split.meta, initial=blob('{"inline": true}'))
    update = journaling(split.meta, stack)
    assert update.token_hash
    ok(split.meta.append_journal(update.id, update.token_hash, NOW + 1, b"inline batch"))
    ok(split.append_journal(update.id, update.token_hash, NOW + 2, b"s3 batch"))
    assert state_text(split, stack.id, None) == '{"inline": true}'
    assert ok(split.get_journal(update.id)) == [b"inline batch", b"s3 batch"]


def test_a_failed_put_writes_no_row(split: BlobbedStore) -> None:
    stack = make_stack(split)
    update = started(split, stack, now=NOW + 1)
    assert update.token_hash
    broken = BlobbedStore(
        split.meta,
        S3Blobs.open(
            "s3://no-such-bucket-pulumid?endpoint=http://127.0.0.1:9&path_style=1",
            InlineRunner(),
            connect_timeout=0.5,
            max_attempts=1,
        ),
    )
    state = StateBlob(gzip.compress(b'{"new": 1}'), 1)
    fails(broken.save_checkpoint(update.id, update.token_hash, NOW + 2, state, 1), Unavailable)
    # The update's checkpoint did not move: the row never named the blob that failed.
    record = ok(split.get_update(update.id))
    assert record is not None and record.checkpoint_seq == 0
