"""pulumid's own HTTP calls to identity providers (discovery, JWKS, token endpoints, Google's
APIs), with treq on the reactor: one place for timeouts and for reading JSON answers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import treq
from twisted.web.http_headers import Headers

TIMEOUT = 15.0


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}


async def _get(
    url: str, headers: Mapping[str, str] | None, timeout: float = TIMEOUT
) -> tuple[int, bytes]:
    sent = {"Accept": "application/json", **(headers or {})}
    wire = Headers({name.encode(): [value.encode()] for name, value in sent.items()})
    response = await treq.get(url, headers=wire, timeout=timeout)
    return response.code, await response.content()


async def get_json(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
    """GET URL: (status, the body as JSON, {} when it is not)."""
    status, raw = await _get(url, headers)
    return status, _json(raw)


async def post_form(
    url: str, form: Mapping[str, str], client: tuple[str, str] | None = None
) -> tuple[int, Any]:
    """POST a form (with HTTP basic client credentials when given): (status, JSON body)."""
    response = await treq.post(url, data=dict(form), auth=client, timeout=TIMEOUT)
    return response.code, _json(await response.content())


async def fetch_json(url: str, timeout: float = 10.0) -> Any:
    """GET URL as JSON; anything but a 200 with JSON raises (discovery documents, JWKS)."""
    status, raw = await _get(url, None, timeout)
    if status != 200:
        raise OSError(f"GET {url}: HTTP {status}")
    return json.loads(raw)
