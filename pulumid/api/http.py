"""Request bodies (size limits, gzip), JSON responses and the error mapping, in one place."""

from __future__ import annotations

import json
import time
from io import BytesIO
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException

from pulumid.api.gate import Gate, Verdict
from pulumid.auth.principal import Principal
from pulumid.engine import deployments
from pulumid.errors import BadRequest, PulumidError, TooLarge
from pulumid.threads import Runner

log = Logger()

# Sent with every answer: nothing here is meant to be framed, sniffed or followed by referrer.
SECURITY_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)

# Below this size JSON and gzip work is cheaper on the reactor than a thread hop.
INLINE_LIMIT = 64 * 1024


class LimitedRequest(Request):
    """A Request that buffers a body only when it is within the limit and the gate let it in.

    The gate looks at the credentials as soon as the headers are in. While it looks (a
    database read for an update token), reading from the connection is paused and what had
    already arrived is held; a refused or oversized body is discarded as it arrives.
    """

    max_body_size = 256 * 1024 * 1024
    gate: Gate | None = None
    principal: Principal | None = None  # the caller, once authenticated

    def gotLength(self, length: int | None) -> None:
        self.started = time.monotonic()
        self.body_too_large = length is not None and length > self.max_body_size
        self.body_received = 0
        self.refused: PulumidError | None = None
        self.verdict: Deferred[None] | None = None
        self._held: list[bytes] | None = None
        if self.body_too_large or length == 0 or self.gate is None:
            self._admit(None, length)
            return
        outcome = self.gate.check(self, length)
        if isinstance(outcome, Deferred):
            self._held = []
            self.content = BytesIO()
            self._reading(False)
            self.verdict = outcome.addCallback(self._decided, length)
        else:
            self._admit(outcome, length)

    def _decided(self, verdict: Verdict, length: int | None) -> None:
        held, self._held = self._held or [], None
        self._admit(verdict, length)
        if verdict is None:
            for chunk in held:
                self._keep(chunk)
        self._reading(True)

    def _reading(self, on: bool) -> None:
        # The handler may have answered (without the body) and the request be gone.
        channel = getattr(self, "channel", None)
        transport: Any = getattr(channel, "transport", None)
        if transport is not None:
            (transport.resumeProducing if on else transport.pauseProducing)()

    def _admit(self, verdict: Verdict, length: int | None) -> None:
        self.refused = verdict
        if verdict is not None or self.body_too_large:
            self.content = BytesIO()  # stays empty: the body is discarded
        else:
            super().gotLength(length)

    def process(self) -> None:
        for name, value in SECURITY_HEADERS:
            self.setHeader(name, value)
        if self.isSecure():
            self.setHeader(b"strict-transport-security", b"max-age=31536000")
        # The router needs a UTF-8 URL; answer the others here, with the usual error body.
        try:
            unquote_to_bytes(self.path).decode("utf-8")
            self.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            error = BadRequest("Bad Request: the URL is not valid UTF-8")
            self.setResponseCode(error.status)
            self.setHeader(b"content-type", b"application/json")
            self.write(json.dumps(error.body()).encode())
            self.finish()
            return
        super().process()

    def handleContentChunk(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)  # reading is paused: at most what one read brought
        else:
            self._keep(data)

    def _keep(self, data: bytes) -> None:
        self.body_received += len(data)
        if self.body_received > self.max_body_size:
            self.body_too_large = True
        if not self.body_too_large and self.refused is None:
            super().handleContentChunk(data)


def limited_request_factory(max_body_size: int, gate: Gate | None = None) -> type[LimitedRequest]:
    return type("PulumidRequest", (LimitedRequest,), {"max_body_size": max_body_size, "gate": gate})


async def read_body(request: IRequest, cpu: Runner, limit: int) -> bytes:
    _wire, body = await read_wire(request, cpu, limit)
    return body


async def read_wire(request: IRequest, cpu: Runner, limit: int) -> tuple[bytes, bytes]:
    """(the body as sent, the body decompressed): some bodies are stored as they came."""
    verdict = getattr(request, "verdict", None)
    if verdict is not None:
        await verdict
    refused = getattr(request, "refused", None)
    if refused is not None:
        raise refused
    if getattr(request, "body_too_large", False):
        raise TooLarge(f"Payload Too Large: the request body exceeds {limit} bytes")
    content = request.content
    content.seek(0)
    raw: bytes = content.read()
    encoding = (request.getHeader("content-encoding") or "").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        if len(raw) < INLINE_LIMIT // 8:
            return raw, deployments.gunzip_blocking(raw, limit)
        return raw, await cpu.run(deployments.gunzip_blocking, raw, limit)
    if encoding not in ("", "identity"):
        raise BadRequest(f"Bad Request: unsupported Content-Encoding {encoding!r}")
    if len(raw) > limit:
        raise TooLarge(f"Payload Too Large: the request body exceeds {limit} bytes")
    return raw, raw


async def read_json(request: IRequest, cpu: Runner, limit: int) -> Any:
    return await parse_json(await read_body(request, cpu, limit), cpu)


async def parse_json(body: bytes, cpu: Runner) -> Any:
    """A body's JSON ({} when empty), parsed off the reactor when it is large."""
    if not body.strip():
        return {}
    if len(body) < INLINE_LIMIT:
        return deployments.load_json_blocking(body)
    return await cpu.run(deployments.load_json_blocking, body)


async def read_object(request: IRequest, cpu: Runner, limit: int) -> dict[str, Any]:
    value = await read_json(request, cpu, limit)
    if not isinstance(value, dict):
        raise BadRequest("Bad Request: the request body must be a JSON object")
    return value


def json_response(request: IRequest, value: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer past 64 bits, say: the slower encoder takes anything
        return json.dumps(value, separators=(",", ":")).encode()


def raw_json_response(request: IRequest, body: bytes, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return body


def no_content(request: IRequest) -> bytes:
    request.setResponseCode(204)
    return b""


def error_response(request: IRequest, failure: Failure) -> bytes:
    """Map any failure to {"code", "message"}; internals never leak to the client."""
    error = failure.value
    if isinstance(error, PulumidError):
        return json_response(request, error.body(), error.status)
    if isinstance(error, HTTPException):
        status = error.code or 500
        phrase = http.RESPONSES.get(status, b"Error").decode()
        if status == 404:
            message = f"{phrase}: no route for {request.method.decode()} {request.path.decode()}"
        else:
            message = f"{phrase}: {error.description or phrase}"
    else:
        log.failure("unhandled error serving {path}", failure, path=request.path)
        status, message = 500, "Internal Server Error: the server failed to handle the request"
    return json_response(request, {"code": status, "message": message}, status)
