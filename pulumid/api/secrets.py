"""The service secrets manager: encrypt and decrypt, one value or a batch."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson
from twisted.web.iweb import IRequest

from pulumid.api import shapes
from pulumid.api.base import BASE, Routes, route
from pulumid.api.http import json_response, no_content, raw_json_response
from pulumid.auth.access import stack
from pulumid.auth.roles import Role
from pulumid.errors import BadRequest
from pulumid.storage.records import StackRef


class SecretRoutes(Routes):
    @route(
        f"{BASE}/encrypt", "POST", stack(Role.WRITE), body=shapes.ENCRYPT, answer=shapes.ENCRYPTED
    )
    async def encrypt(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        body = await self._body(request)
        [ciphertext] = await self.backend.encrypt(
            StackRef(org, project, stack), [_b64decode(body.get("plaintext"))]
        )
        return json_response(request, {"ciphertext": _b64(ciphertext)})

    @route(
        f"{BASE}/decrypt", "POST", stack(Role.WRITE), body=shapes.DECRYPT, answer=shapes.DECRYPTED
    )
    async def decrypt(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        body = await self._body(request)
        [plaintext] = await self.backend.decrypt(
            StackRef(org, project, stack), [_b64decode(body.get("ciphertext"))]
        )
        return json_response(request, {"plaintext": _b64(plaintext)})

    @route(
        f"{BASE}/batch-encrypt",
        "POST",
        stack(Role.WRITE),
        body=shapes.BATCH_ENCRYPT,
        answer=shapes.BATCH_ENCRYPTED,
    )
    async def batch_encrypt(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        values = _string_list(await self._body(request), "plaintexts")
        size = sum(len(v) for v in values)
        plaintexts = await self._offload(size, _b64decode_all, values)
        ciphertexts = await self.backend.encrypt(StackRef(org, project, stack), plaintexts)
        body = await self._offload(size, _encrypted_body, ciphertexts)
        return raw_json_response(request, body)

    @route(
        f"{BASE}/batch-decrypt",
        "POST",
        stack(Role.WRITE),
        body=shapes.BATCH_DECRYPT,
        answer=shapes.BATCH_DECRYPTED,
    )
    async def batch_decrypt(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        values = list(dict.fromkeys(_string_list(await self._body(request), "ciphertexts")))
        size = sum(len(v) for v in values)
        ciphertexts = await self._offload(size, _b64decode_all, values)
        plaintexts = await self.backend.decrypt(StackRef(org, project, stack), ciphertexts)
        body = await self._offload(size, _decrypted_body, values, plaintexts)
        return raw_json_response(request, body)

    # Decryption audit calls from the CLI (best effort): accepted, nothing to keep.
    @route(f"{BASE}/decrypt/log-decryption", "POST", stack(Role.READ))
    def log_decryption(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        return no_content(request)

    @route(f"{BASE}/decrypt/log-batch-decryption", "POST", stack(Role.READ))
    def log_batch_decryption(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        return no_content(request)


def _b64decode(value: Any) -> bytes:
    if not isinstance(value, str):
        raise BadRequest("Bad Request: expected a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("Bad Request: invalid base64 value") from None


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _b64decode_all(values: list[str]) -> list[bytes]:
    return [_b64decode(v) for v in values]


def _encrypted_body(ciphertexts: list[bytes]) -> bytes:
    return orjson.dumps({"ciphertexts": [_b64(c) for c in ciphertexts]})


def _decrypted_body(keys: list[str], plaintexts: list[bytes]) -> bytes:
    # Keys are the ciphertext strings exactly as the CLI sent them.
    return orjson.dumps(
        {"plaintexts": {key: _b64(p) for key, p in zip(keys, plaintexts, strict=True)}}
    )


def _string_list(body: dict[str, Any], key: str) -> list[str]:
    values = body.get(key)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise BadRequest(f"Bad Request: '{key}' must be a list of base64 strings")
    return values
