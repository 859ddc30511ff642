"""The gate (pulumid.api.gate) for bodies sent without credentials: the token exchange is the
one public route that takes a body, and only a small one (PUBLIC_BODIES); other bodies from
callers without credentials are dropped as they arrive.

The request object is Twisted's own (through pulumid's LimitedRequest) on a dummy channel:
what is observed is how much of an arriving body the request keeps."""

from __future__ import annotations

from typing import Any, cast

from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyChannel

from pulumid.api.gate import PUBLIC_BODIES, Gate
from pulumid.api.http import LimitedRequest, limited_request_factory
from pulumid.errors import TooLarge, Unauthorized

MAX_BODY = 8 * 1024 * 1024
CHUNK = b"x" * (64 * 1024)
EXCHANGE = b"/api/oauth/token"


class Nobody:
    """An authenticator that knows no one (no credentials were sent)."""

    def check(self, headers: Headers) -> Any:
        raise Unauthorized("Unauthorized: No credentials provided or are invalid.")


def request_for(path: bytes) -> LimitedRequest:
    factory = limited_request_factory(MAX_BODY, Gate(cast(Any, Nobody())))
    channel: Any = DummyChannel()
    channel._path = path  # what the gate reads: the request line's path
    request: LimitedRequest = factory(channel)
    return request


def kept(request: LimitedRequest) -> int:
    content = request.content
    assert content is not None
    content.seek(0, 2)
    size: int = content.tell()
    return size


def feed(request: LimitedRequest, chunks: int) -> None:
    for _ in range(chunks):
        request.handleContentChunk(CHUNK)


def test_a_body_without_credentials_is_dropped() -> None:
    for length in (len(CHUNK) * 4, None):  # declared, or chunked
        request = request_for(b"/api/stacks/acme/web")
        request.gotLength(length)
        assert isinstance(request.refused, Unauthorized)
        feed(request, 4)
        assert kept(request) == 0


def test_a_small_exchange_form_is_kept() -> None:
    request = request_for(EXCHANGE)
    request.gotLength(len(CHUNK) // 2)
    assert request.refused is None
    request.handleContentChunk(CHUNK[: len(CHUNK) // 2])
    assert kept(request) == len(CHUNK) // 2


def test_a_declared_oversized_exchange_form_is_dropped() -> None:
    request = request_for(EXCHANGE + b"?x=1")
    request.gotLength(PUBLIC_BODIES[EXCHANGE] + 1)
    assert isinstance(request.refused, TooLarge)
    feed(request, 16)
    assert kept(request) == 0


def test_a_chunked_exchange_form_is_not_kept_beyond_the_public_limit() -> None:
    """Without Content-Length (chunked), a caller without credentials should not get more of
    its body buffered than a declared one would: 64 KiB, not the 8 MiB max_body_size."""
    request = request_for(EXCHANGE)
    request.gotLength(None)
    feed(request, 64)  # 4 MiB
    limit = PUBLIC_BODIES[EXCHANGE]
    assert kept(request) <= limit + len(CHUNK), f"kept {kept(request)} bytes"
