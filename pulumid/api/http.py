"""Request bodies (size limits, gzip), JSON responses and the error mapping, in one place."""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException

from pulumid.engine import deployments
from pulumid.errors import BadRequest, PulumidError, TooLarge
from pulumid.threads import Runner

log = Logger()

# Below this size JSON and gzip work is cheaper on the reactor than a thread hop.
INLINE_LIMIT = 64 * 1024


class LimitedRequest(Request):
    """A Request that stops buffering a body once it passes the configured limit."""

    max_body_size = 256 * 1024 * 1024

    def gotLength(self, length: int | None) -> None:
        self.body_too_large = length is not None and length > self.max_body_size
        self.body_received = 0
        super().gotLength(None if self.body_too_large else length)

    def handleContentChunk(self, data: bytes) -> None:
        self.body_received += len(data)
        if self.body_received > self.max_body_size:
            self.body_too_large = True
        if not self.body_too_large:
            super().handleContentChunk(data)


def limited_request_factory(max_body_size: int) -> type[LimitedRequest]:
    return type("PulumidRequest", (LimitedRequest,), {"max_body_size": max_body_size})


async def read_body(request: IRequest, cpu: Runner, limit: int) -> bytes:
    _wire, body = await read_wire(request, cpu, limit)
    return body


async def read_wire(request: IRequest, cpu: Runner, limit: int) -> tuple[bytes, bytes]:
    """(the body as sent, the body decompressed): some bodies are stored as they came."""
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
    body = await read_body(request, cpu, limit)
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
        status, message = error.status, error.message
    elif isinstance(error, HTTPException):
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
