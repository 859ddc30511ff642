"""Key rotation (pulumid.secrets.rotation.KeyRotation) on a real SQLite store: data keys are
re-wrapped under the new primary a batch per transaction, every secret decrypts at every
moment (also after an interruption), and only the node with the newest primary rotates.
Moving to and from AWS KMS uses the real local-kms (tests/local_kms.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from pulumid.engine.secrets import (
    PRIMARY,
    SITE_KEY,
    MasterKeyMismatch,
    StackSecrets,
    decode_wrapped,
)
from pulumid.secrets import crypto
from pulumid.secrets.keys import KeyProvider, Keyring, LocalKey, build_keyring
from pulumid.secrets.rotation import CLAIM, KeyRotation, Progress
from pulumid.storage.faults import Faults
from pulumid.storage.records import WrappedKey
from pulumid.storage.sqlite import SQLiteStore
from pulumid.threads import InlineRunner
from tests.contract.test_store import ok
from tests.local_kms import LocalKMS, local_kms
from tests.secrets.test_keys import (
    aws_env,
    decrypts,
    encrypt_one,
    legacy_database,
    local,
    make_stacks,
    refused,
    run,
    secrets_of,
    stack_key_ids,
    store,
)

__all__ = ["aws_env", "store"]  # fixtures

Saved = dict[int, tuple[bytes, bytes]]


def populate(store: SQLiteStore, key: KeyProvider, count: int) -> tuple[Saved, bytes]:
    """COUNT stacks whose data keys KEY wraps, a secret each; and the site key."""
    secrets_ = secrets_of(store, Keyring(key))
    run(secrets_.check_keys())
    saved = {stack: encrypt_one(secrets_, stack) for stack in make_stacks(store, count)}
    site = run(secrets_.site_key())
    assert stack_key_ids(store) == {key.key_id: count}
    return saved, site


def all_decrypt(secrets_: StackSecrets, saved: Saved) -> bool:
    return all(decrypts(secrets_, stack, secret) for stack, secret in saved.items())


def site_key_id(store: SQLiteStore) -> str:
    stored = ok(store.get_meta(SITE_KEY))
    assert stored is not None
    return decode_wrapped(stored).key_id


def rotation(
    store: SQLiteStore,
    keyring: Keyring,
    batch: int = 100,
    faults: Faults | None = None,
    node: str = "node-1",
) -> KeyRotation:
    return KeyRotation(store, keyring, Clock(), node, batch, faults)


def count_batches(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every rewrap_stack_keys call (one transaction each) from now on."""
    sizes: list[int] = []
    real = store.rewrap_stack_keys

    def spy(rows: list[tuple[int, str, WrappedKey]]) -> Deferred[int]:
        sizes.append(len(rows))
        return real(rows)

    monkeypatch.setattr(store, "rewrap_stack_keys", spy)
    return sizes


def test_rotation_rewraps_every_data_key_in_batches(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = local(), local()
    saved, site = populate(store, a, 25)
    keyring = Keyring(b, [a])
    serving = secrets_of(store, keyring)  # a node serving through the rotation
    run(serving.check_keys())
    assert all_decrypt(serving, saved)  # its data keys cached
    sizes = count_batches(store, monkeypatch)
    rotator = rotation(store, keyring, batch=7)
    progress = run(rotator.run())
    assert progress == Progress(rewrapped=25, skipped=0, remaining={b.key_id: 25})
    assert rotator.counts == {b.key_id: 25}
    assert sizes == [7, 7, 7, 4]
    assert stack_key_ids(store) == {b.key_id: 25}
    assert site_key_id(store) == b.key_id
    # Every secret decrypts through a fresh manager with both keys, and with B alone.
    assert all_decrypt(secrets_of(store, Keyring(b, [a])), saved)
    only_b = secrets_of(store, Keyring(b))
    run(only_b.check_keys())
    assert all_decrypt(only_b, saved)
    assert run(only_b.site_key()) == site
    # The node that cached the data keys agrees: the same data keys, wrapped anew.
    later = {stack: encrypt_one(serving, stack) for stack in saved}
    assert all_decrypt(only_b, later)
    # Nothing left: a second run changes nothing.
    assert run(rotation(store, keyring, batch=7).run()).rewrapped == 0
    # A with A alone is now refused: nothing it could open is left to it.
    message = refused(secrets_of(store, Keyring(a)).check_keys(), MasterKeyMismatch)
    assert b.key_id in message


def test_an_interrupted_rotation_leaves_every_secret_readable_and_resumes(
    store: SQLiteStore,
) -> None:
    a, b = local(), local()
    saved, site = populate(store, a, 25)
    keyring = Keyring(b, [a])
    run(secrets_of(store, keyring).check_keys())
    faults = Faults.parse("ioerror@rewrapped:2")  # after the second batch committed
    message = refused(
        rotation(store, keyring, batch=7, faults=faults).run(), sqlite3.OperationalError
    )
    assert "injected" in message
    assert stack_key_ids(store) == {b.key_id: 14, a.key_id: 11}
    moved = {s for s in saved if (k := ok(store.get_stack_key(s))) and k.key_id == b.key_id}
    assert moved == set(sorted(saved)[:14])
    assert site_key_id(store) == a.key_id  # the site key comes last
    # In this state every stack decrypts with both keys, and a node with B alone is refused.
    both = secrets_of(store, Keyring(b, [a]))
    run(both.check_keys())
    assert all_decrypt(both, saved)
    assert run(both.site_key()) == site
    message = refused(secrets_of(store, Keyring(b)).check_keys(), MasterKeyMismatch)
    assert message.startswith(f"11 stacks' data keys are wrapped by {a.key_id}")
    # The next run goes on from the rows.
    progress = run(rotation(store, keyring, batch=7).run())
    assert progress.rewrapped == 11 and progress.skipped == 0
    assert stack_key_ids(store) == {b.key_id: 25}
    assert site_key_id(store) == b.key_id
    only_b = secrets_of(store, Keyring(b))
    run(only_b.check_keys())
    assert all_decrypt(only_b, saved)


def test_tick_rotates_under_the_claim(store: SQLiteStore) -> None:
    a, b = local(), local()
    saved, _ = populate(store, a, 4)
    keyring = Keyring(b, [a])
    run(secrets_of(store, keyring).check_keys())
    # Another node holds the claim: no rotation this tick.
    assert ok(store.claim(CLAIM, "node-2", 0.0, 600.0))
    rotator = rotation(store, keyring)
    run(rotator.tick())
    assert rotator.last is None and stack_key_ids(store) == {a.key_id: 4}
    assert rotator.counts == {a.key_id: 4}
    # Once it is free (expired), this node rotates, and frees the claim after.
    ok(store.claim(CLAIM, "node-2", 0.0, 0.0))
    run(rotator.tick())
    assert rotator.last is not None and rotator.last.rewrapped == 4
    assert stack_key_ids(store) == {b.key_id: 4}
    assert ok(store.claim(CLAIM, "node-2", 0.0, 600.0))
    assert all_decrypt(secrets_of(store, Keyring(b)), saved)


def test_a_node_without_the_newest_primary_does_not_rotate(store: SQLiteStore) -> None:
    a, b = local(), local()
    saved, _ = populate(store, a, 5)
    # The new configuration started (primary B) and rotated everything to B...
    new = Keyring(b, [a])
    run(secrets_of(store, new).check_keys())
    run(rotation(store, new, node="new-node").tick())  # frees the claim when done
    assert stack_key_ids(store) == {b.key_id: 5}
    assert ok(store.get_meta(PRIMARY)) == b.key_id.encode()
    # ...while a node of the old configuration (primary A, B given as previous) still runs.
    old = Keyring(a, [b])
    rotator = rotation(store, old, node="old-node")
    run(rotator.tick())
    assert rotator.last is None
    assert stack_key_ids(store) == {b.key_id: 5}
    assert site_key_id(store) == b.key_id
    assert ok(store.claim(CLAIM, "node-2", 0.0, 600.0))  # it did not even take the claim
    ok(store.claim(CLAIM, "node-2", 0.0, 0.0))
    assert all_decrypt(secrets_of(store, old), saved)
    # Had A been the newest primary, the same tick would have turned everything back.
    ok(store.put_meta(PRIMARY, a.key_id.encode()))
    run(rotator.tick())
    assert rotator.last is not None and rotator.last.rewrapped == 5
    assert stack_key_ids(store) == {a.key_id: 5}


def test_rows_wrapped_by_an_unknown_key_are_skipped_and_left(store: SQLiteStore) -> None:
    a, b, c = local(), local(), local()
    saved, _ = populate(store, a, 6)
    stranger_rows = set(sorted(saved)[1::2])
    for stack in stranger_rows:  # as if another node with key C had written them
        wrapped = run(c.wrap(crypto.new_data_key(), b"pulumid/stack/%d" % stack))
        ok(store.rewrap_stack_keys([(stack, a.key_id, WrappedKey(c.key_id, wrapped))]))
    before = {s: ok(store.get_stack_key(s)) for s in stranger_rows}
    keyring = Keyring(b, [a])
    progress = run(rotation(store, keyring, batch=2).run())
    assert progress.rewrapped == 3 and progress.skipped == 3
    assert progress.remaining == {b.key_id: 3, c.key_id: 3}
    assert {s: ok(store.get_stack_key(s)) for s in stranger_rows} == before
    readable = {s: saved[s] for s in saved if s not in stranger_rows}
    assert all_decrypt(secrets_of(store, Keyring(b)), readable)
    # Skipped again on the next run, rotated once a node has C.
    assert run(rotation(store, keyring).run()).skipped == 3
    progress = run(rotation(store, Keyring(b, [a, c])).run())
    assert progress.rewrapped == 3 and progress.skipped == 0
    assert stack_key_ids(store) == {b.key_id: 6}


def test_adopted_legacy_rows_rotate(store: SQLiteStore) -> None:
    master = crypto.MasterKey.generate()
    saved = legacy_database(store, master, 5)
    new = local()
    keyring = Keyring(new, [LocalKey(master)])
    run(secrets_of(store, keyring).check_keys())
    assert run(rotation(store, keyring, batch=2).run()).rewrapped == 5
    assert stack_key_ids(store) == {new.key_id: 5}
    assert all_decrypt(secrets_of(store, Keyring(new)), saved)


# -- local key -> AWS KMS -> local key ----------------------------------------------------


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKMS]:
    with local_kms(tmp_path_factory.mktemp("local-kms")) as server:
        yield server


@pytest.mark.live
@pytest.mark.usefixtures("aws_env")
def test_moving_to_aws_kms_and_back(store: SQLiteStore, kms: LocalKMS, tmp_path: Path) -> None:
    master = crypto.MasterKey.generate()
    runner = InlineRunner()
    aws = f"awskms://{kms.create_key()}?region={kms.region}&endpoint={kms.endpoint}"

    def keyring(primary: str, *previous: str) -> Keyring:
        return build_keyring(primary, previous, master, runner)

    local_id = LocalKey(master).key_id
    saved, site = populate(store, LocalKey(master), 6)

    # To AWS KMS, the master key kept as a previous key while the data keys move.
    to_kms = keyring(aws, "local")
    kms_id = to_kms.primary.key_id
    assert kms_id.startswith("awskms:arn:aws:kms:")
    run(secrets_of(store, to_kms).check_keys())
    assert all_decrypt(secrets_of(store, to_kms), saved)
    progress = run(rotation(store, to_kms, batch=4).run())
    assert progress.rewrapped == 6 and progress.remaining == {kms_id: 6}
    assert site_key_id(store) == kms_id
    # The master key retired: KMS alone opens everything.
    only_kms = secrets_of(store, keyring(aws))
    run(only_kms.check_keys())
    assert all_decrypt(only_kms, saved)
    assert run(only_kms.site_key()) == site
    # The master key alone no longer can.
    message = refused(secrets_of(store, keyring("local")).check_keys(), MasterKeyMismatch)
    assert message.startswith(f"6 stacks' data keys are wrapped by {kms_id}")

    # And back to the local key.
    to_local = keyring("local", aws)
    run(secrets_of(store, to_local).check_keys())
    assert all_decrypt(secrets_of(store, to_local), saved)
    progress = run(rotation(store, to_local, batch=4).run())
    assert progress.rewrapped == 6 and progress.remaining == {local_id: 6}
    assert site_key_id(store) == local_id
    only_local = secrets_of(store, keyring("local"))
    run(only_local.check_keys())
    assert all_decrypt(only_local, saved)
    assert run(only_local.site_key()) == site
    message = refused(secrets_of(store, keyring(aws)).check_keys(), MasterKeyMismatch)
    assert local_id in message
