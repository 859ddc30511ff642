from __future__ import annotations

import os

import pytest

from pulumid.secrets.crypto import (
    FORMAT_VERSION,
    HEADER_SIZE,
    NONCE_SIZE,
    DecryptionError,
    InvalidMasterKey,
    MasterKey,
    check_canary,
    decrypt_many,
    decrypt_value,
    encrypt_many,
    encrypt_value,
    make_canary,
    new_data_key,
    unwrap_data_key,
    wrap_data_key,
)

CTX = b"acme/web/dev"


@pytest.mark.parametrize(
    "plaintext",
    [
        b"",
        b"hunter2",
        bytes(range(256)),
        b"\xff\xfe\x00invalid utf-8 \xc3\x28",
        os.urandom(1 << 20),
    ],
    ids=["empty", "text", "all-bytes", "bad-utf8", "1mb"],
)
def test_value_round_trip(plaintext: bytes) -> None:
    key = new_data_key()
    blob = encrypt_value(key, plaintext, context=CTX)
    assert blob[0] == FORMAT_VERSION
    assert len(blob) == HEADER_SIZE + len(plaintext) + 16
    assert decrypt_value(key, blob, context=CTX) == plaintext


def test_data_key_round_trip() -> None:
    master = MasterKey.generate()
    data_key = new_data_key()
    assert len(data_key) == 32
    wrapped = wrap_data_key(master, data_key, context=CTX)
    assert data_key not in wrapped
    assert unwrap_data_key(master, wrapped, context=CTX) == data_key

    with pytest.raises(DecryptionError):
        unwrap_data_key(MasterKey.generate(), wrapped, context=CTX)
    with pytest.raises(DecryptionError):
        unwrap_data_key(master, wrapped, context=b"acme/web/prod")


def test_wrap_rejects_short_data_key() -> None:
    with pytest.raises(ValueError):
        wrap_data_key(MasterKey.generate(), b"short", context=CTX)


def test_nonces_differ() -> None:
    key = new_data_key()
    first = encrypt_value(key, b"same", context=CTX)
    second = encrypt_value(key, b"same", context=CTX)
    assert first[1 : 1 + NONCE_SIZE] != second[1 : 1 + NONCE_SIZE]
    assert first != second


def test_wrong_key_fails() -> None:
    blob = encrypt_value(new_data_key(), b"secret", context=CTX)
    with pytest.raises(DecryptionError):
        decrypt_value(new_data_key(), blob, context=CTX)


def test_wrong_context_fails() -> None:
    key = new_data_key()
    blob = encrypt_value(key, b"secret", context=CTX)
    with pytest.raises(DecryptionError):
        decrypt_value(key, blob, context=b"acme/web/prod")


@pytest.mark.parametrize("position", [1, HEADER_SIZE, -1])
def test_tampered_byte_fails(position: int) -> None:
    key = new_data_key()
    blob = bytearray(encrypt_value(key, b"top secret value", context=CTX))
    blob[position] ^= 0x01
    with pytest.raises(DecryptionError) as info:
        decrypt_value(key, bytes(blob), context=CTX)
    message = str(info.value)
    assert "top secret" not in message
    assert key.hex() not in message


@pytest.mark.parametrize("length", [0, 1, HEADER_SIZE, HEADER_SIZE + 15])
def test_truncated_fails(length: int) -> None:
    key = new_data_key()
    blob = encrypt_value(key, b"", context=CTX)
    with pytest.raises(DecryptionError, match="too short"):
        decrypt_value(key, blob[:length], context=CTX)


def test_truncated_tag_fails() -> None:
    key = new_data_key()
    blob = encrypt_value(key, b"some plaintext", context=CTX)
    with pytest.raises(DecryptionError):
        decrypt_value(key, blob[:-1], context=CTX)


def test_unknown_version_fails() -> None:
    key = new_data_key()
    blob = encrypt_value(key, b"secret", context=CTX)
    with pytest.raises(DecryptionError, match="version"):
        decrypt_value(key, bytes([FORMAT_VERSION + 1]) + blob[1:], context=CTX)


def test_canary() -> None:
    master = MasterKey.generate()
    canary = make_canary(master)
    assert check_canary(master, canary)
    assert check_canary(MasterKey.from_hex(master.hex()), canary)
    assert not check_canary(MasterKey.generate(), canary)
    assert not check_canary(master, canary[:-1])
    assert not check_canary(master, b"")


def test_master_key_hex_round_trip() -> None:
    master = MasterKey.generate()
    text = master.hex()
    assert len(text) == 64
    assert MasterKey.from_hex(text) == master
    assert MasterKey.from_hex(text.upper() + "\n") == master
    assert text not in repr(master)


@pytest.mark.parametrize(
    "text",
    ["", "ab" * 31, "ab" * 33, "zz" * 32, "ab" * 31 + " a", "0x" + "ab" * 31, "é" * 64],
    ids=["empty", "short", "long", "non-hex", "inner-space", "0x-prefix", "non-ascii"],
)
def test_from_hex_rejects_bad_input(text: str) -> None:
    with pytest.raises(InvalidMasterKey) as info:
        MasterKey.from_hex(text)
    assert isinstance(info.value, ValueError)
    assert "hex" in str(info.value)


def test_many_round_trip() -> None:
    key = new_data_key()
    plaintexts = [os.urandom(i % 64) for i in range(1000)]
    blobs = encrypt_many(key, plaintexts, context=CTX)
    assert len(blobs) == 1000
    assert decrypt_many(key, blobs, context=CTX) == plaintexts
    # Each value is independently decryptable.
    assert decrypt_value(key, blobs[500], context=CTX) == plaintexts[500]


def test_decrypt_many_reports_bad_index() -> None:
    key = new_data_key()
    blobs = encrypt_many(key, [b"a", b"b", b"c"], context=CTX)
    blobs[1] = blobs[1][:-1] + bytes([blobs[1][-1] ^ 1])
    with pytest.raises(DecryptionError, match="value 1"):
        decrypt_many(key, blobs, context=CTX)
