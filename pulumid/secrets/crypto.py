"""Envelope encryption for stack secrets.

A master key (from configuration) wraps per-stack data keys; data keys encrypt
secret values. Every blob has the same layout:

    version (1 byte) | nonce (12 bytes) | AES-256-GCM ciphertext and tag

The caller's `context` is bound in as associated data, so a blob copied to another
stack or purpose fails to decrypt instead of yielding the wrong secret.
"""

from __future__ import annotations

import hmac
import os
import string

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FORMAT_VERSION = 1
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = 1 + NONCE_SIZE
MIN_BLOB_SIZE = HEADER_SIZE + TAG_SIZE

_CANARY_CONTEXT = b"pulumid/canary/v1"
_CANARY_PLAINTEXT = b"pulumid master key canary"
_HEX_DIGITS = frozenset(string.hexdigits)


class InvalidMasterKey(ValueError):
    """The configured master key is not 64 hex characters."""


class DecryptionError(Exception):
    """A blob could not be decrypted. The message never contains key or plaintext data."""


class MasterKey:
    """A 256-bit key that wraps data keys. Its repr never shows the key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise InvalidMasterKey(f"master key must be {KEY_SIZE} bytes, got {len(key)}")
        self._key = bytes(key)

    @classmethod
    def from_hex(cls, text: str) -> MasterKey:
        # Tolerate the trailing newline of a key file, but nothing inside the key:
        # bytes.fromhex alone would also accept embedded spaces.
        text = text.strip()
        if len(text) != KEY_SIZE * 2:
            raise InvalidMasterKey(
                f"master key must be {KEY_SIZE * 2} hex characters, got {len(text)} characters"
            )
        if not set(text) <= _HEX_DIGITS:
            raise InvalidMasterKey("master key must contain only hex characters 0-9 and a-f")
        return cls(bytes.fromhex(text))

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(os.urandom(KEY_SIZE))

    def hex(self) -> str:
        return self._key.hex()

    def _aead(self) -> AESGCM:
        return AESGCM(self._key)

    def derive(self, purpose: bytes) -> bytes:
        """A separate 256-bit key for PURPOSE (HKDF-SHA256): other uses never see this one."""
        return derive_key(self._key, purpose)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MasterKey):
            return NotImplemented
        return hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return "MasterKey(<redacted>)"


def derive_key(root: bytes, purpose: bytes) -> bytes:
    """A 256-bit key for PURPOSE from ROOT (HKDF-SHA256)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=purpose)
    return hkdf.derive(root)


def new_data_key() -> bytes:
    return os.urandom(KEY_SIZE)


def _data_aead(data_key: bytes) -> AESGCM:
    # AESGCM also takes 128/192-bit keys; insist on 256 so a truncated key is caught.
    if len(data_key) != KEY_SIZE:
        raise ValueError(f"data key must be {KEY_SIZE} bytes, got {len(data_key)}")
    return AESGCM(data_key)


def _seal(aead: AESGCM, plaintext: bytes, context: bytes) -> bytes:
    nonce = os.urandom(NONCE_SIZE)
    return bytes([FORMAT_VERSION]) + nonce + aead.encrypt(nonce, plaintext, context)


def _open(aead: AESGCM, blob: bytes, context: bytes) -> bytes:
    if len(blob) < MIN_BLOB_SIZE:
        raise DecryptionError(f"ciphertext too short ({len(blob)} bytes)")
    if blob[0] != FORMAT_VERSION:
        raise DecryptionError(f"unknown ciphertext format version {blob[0]}")
    nonce = blob[1:HEADER_SIZE]
    try:
        return aead.decrypt(nonce, blob[HEADER_SIZE:], context)
    except InvalidTag:
        raise DecryptionError(
            "ciphertext failed authentication (wrong key, wrong context, or corrupted data)"
        ) from None


def wrap_data_key(master: MasterKey, data_key: bytes, *, context: bytes) -> bytes:
    if len(data_key) != KEY_SIZE:
        raise ValueError(f"data key must be {KEY_SIZE} bytes, got {len(data_key)}")
    return _seal(master._aead(), data_key, context)


def unwrap_data_key(master: MasterKey, wrapped: bytes, *, context: bytes) -> bytes:
    data_key = _open(master._aead(), wrapped, context)
    if len(data_key) != KEY_SIZE:
        raise DecryptionError("wrapped blob does not hold a data key")
    return data_key


def encrypt_value(data_key: bytes, plaintext: bytes, *, context: bytes) -> bytes:
    return _seal(_data_aead(data_key), plaintext, context)


def decrypt_value(data_key: bytes, ciphertext: bytes, *, context: bytes) -> bytes:
    return _open(_data_aead(data_key), ciphertext, context)


def encrypt_many(data_key: bytes, plaintexts: list[bytes], *, context: bytes) -> list[bytes]:
    aead = _data_aead(data_key)
    return [_seal(aead, plaintext, context) for plaintext in plaintexts]


def decrypt_many(data_key: bytes, ciphertexts: list[bytes], *, context: bytes) -> list[bytes]:
    aead = _data_aead(data_key)
    results = []
    for index, blob in enumerate(ciphertexts):
        try:
            results.append(_open(aead, blob, context))
        except DecryptionError as exc:
            raise DecryptionError(f"value {index}: {exc}") from None
    return results


def make_canary(master: MasterKey) -> bytes:
    """A blob stored next to the data so a different master key is noticed at startup."""
    return _seal(master._aead(), _CANARY_PLAINTEXT, _CANARY_CONTEXT)


def check_canary(master: MasterKey, canary: bytes) -> bool:
    try:
        plaintext = _open(master._aead(), canary, _CANARY_CONTEXT)
    except DecryptionError:
        return False
    return hmac.compare_digest(plaintext, _CANARY_PLAINTEXT)


def seal_with_master(master: MasterKey, plaintext: bytes, context: bytes) -> bytes:
    return _seal(master._aead(), plaintext, context)


def open_with_master(master: MasterKey, blob: bytes, context: bytes) -> bytes:
    return _open(master._aead(), blob, context)
