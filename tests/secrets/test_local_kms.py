"""The local-kms harness (tests/local_kms.py) against the real local-kms, and the KMS behaviour
the secrets code may rely on: the encryption context binds a ciphertext, and `decrypt` finds
the key from the ciphertext alone."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.local_kms import ACCOUNT_ID, REGION, LocalKMS, local_kms

pytestmark = pytest.mark.live

CONTEXT = {"pulumid": "stack/1"}
NONCE_SIZE = 12
TAG_SIZE = 16


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKMS]:
    with local_kms(tmp_path_factory.mktemp("local-kms")) as server:
        yield server


@pytest.fixture
def client(kms: LocalKMS) -> Iterator[Any]:
    c = kms.client()
    try:
        yield c
    finally:
        c.close()


def error_code(e: ClientError) -> str:
    return str(e.response["Error"]["Code"])


def test_create_key_returns_an_enabled_symmetric_key(kms: LocalKMS, client: Any) -> None:
    assert kms.endpoint.startswith("http://127.0.0.1:")
    arn = kms.create_key()
    assert arn.startswith(f"arn:aws:kms:{REGION}:{ACCOUNT_ID}:key/")
    meta = client.describe_key(KeyId=arn)["KeyMetadata"]
    assert meta["Arn"] == arn
    assert meta["Enabled"] is True
    assert meta["KeySpec"] == "SYMMETRIC_DEFAULT"
    assert meta["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert kms.create_key() != arn


def test_encrypt_decrypt_with_context(kms: LocalKMS, client: Any) -> None:
    arn = kms.create_key()
    blob = client.encrypt(KeyId=arn, Plaintext=b"hunter2", EncryptionContext=CONTEXT)[
        "CiphertextBlob"
    ]
    # Without a KeyId: the blob names its key.
    out = client.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)
    assert out["Plaintext"] == b"hunter2"
    assert out["KeyId"] == arn
    # With it, too.
    out = client.decrypt(CiphertextBlob=blob, KeyId=arn, EncryptionContext=CONTEXT)
    assert out["Plaintext"] == b"hunter2"


@pytest.mark.parametrize(
    "context",
    [
        {"pulumid": "stack/2"},
        {"pulumid": "stack/1", "extra": "x"},
        {"other": "stack/1"},
        None,
    ],
    ids=["other-value", "extra-pair", "other-name", "none"],
)
def test_decrypt_with_another_context_fails(
    kms: LocalKMS, client: Any, context: dict[str, str] | None
) -> None:
    arn = kms.create_key()
    blob = client.encrypt(KeyId=arn, Plaintext=b"hunter2", EncryptionContext=CONTEXT)[
        "CiphertextBlob"
    ]
    kwargs: dict[str, Any] = {} if context is None else {"EncryptionContext": context}
    with pytest.raises(ClientError) as info:
        client.decrypt(CiphertextBlob=blob, **kwargs)
    assert error_code(info.value) == "InvalidCiphertextException"


def test_context_order_does_not_matter(kms: LocalKMS, client: Any) -> None:
    arn = kms.create_key()
    blob = client.encrypt(KeyId=arn, Plaintext=b"p", EncryptionContext={"a": "1", "b": "2"})[
        "CiphertextBlob"
    ]
    out = client.decrypt(CiphertextBlob=blob, EncryptionContext={"b": "2", "a": "1"})
    assert out["Plaintext"] == b"p"


def test_decrypt_with_another_keys_id_fails(kms: LocalKMS, client: Any) -> None:
    arn, other = kms.create_key(), kms.create_key()
    blob = client.encrypt(KeyId=arn, Plaintext=b"p", EncryptionContext=CONTEXT)["CiphertextBlob"]
    with pytest.raises(ClientError) as info:
        client.decrypt(CiphertextBlob=blob, KeyId=other, EncryptionContext=CONTEXT)
    # AWS answers IncorrectKeyException here; local-kms tries the named key and fails.
    assert error_code(info.value) == "InvalidCiphertextException"


def test_ciphertext_layout(kms: LocalKMS, client: Any) -> None:
    """1 byte ARN length, the ARN, a 4-byte little-endian backing-key version, then AES-GCM
    (nonce, ciphertext, tag)."""
    arn = kms.create_key()
    plaintext = b"x" * 100
    blob = client.encrypt(KeyId=arn, Plaintext=plaintext, EncryptionContext=CONTEXT)[
        "CiphertextBlob"
    ]
    name = arn.encode()
    assert blob[0] == len(name)
    assert blob[1 : 1 + len(name)] == name
    assert blob[1 + len(name) : 5 + len(name)] == b"\0\0\0\0"
    assert len(blob) == 1 + len(name) + 4 + NONCE_SIZE + len(plaintext) + TAG_SIZE
