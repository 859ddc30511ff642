"""What every group of routes shares: the one router, auth, bodies, the error mapping.

Each area of the API (identity, stacks, secrets, updates) is a class of its own module that
routes on the same Klein app; pulumid.api.app composes them into one API.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, TypeVar

from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from pulumid.api.http import INLINE_LIMIT, error_response, read_object
from pulumid.engine.backend import Backend, parse_bounded_int
from pulumid.errors import BadRequest, Forbidden, Unauthorized

T = TypeVar("T")

BASE = "/api/stacks/<org>/<project>/<stack>"
KIND = "<any(update,preview,refresh,destroy):kind>"
UPDATE = f"{BASE}/{KIND}/<update_id>"

STATUS = {
    "not-started": "not started",
    "running": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "failed",
}

app = Klein()


class Routes:
    app = app

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.config = backend.config
        self.cpu = backend.cpu
        self._token = backend.config.token.encode()

    def resource(self) -> IResource:
        return self.app.resource()

    # -- errors ---------------------------------------------------------------------------

    @app.handle_errors(Exception)
    def _errors(self, request: IRequest, failure: Failure) -> bytes:
        return error_response(request, failure)

    # -- auth -----------------------------------------------------------------------------

    def _authorization(self, request: IRequest, scheme: str) -> str:
        header = request.getHeader("authorization") or ""
        given_scheme, _, value = header.partition(" ")
        if given_scheme.lower() != scheme or not value.strip():
            if scheme == "update-token":
                raise Unauthorized("Unauthorized: an update token is required")
            raise Unauthorized("Unauthorized: No credentials provided or are invalid.")
        return value.strip()

    def _user(self, request: IRequest) -> None:
        token = self._authorization(request, "token")
        if not hmac.compare_digest(token.encode(), self._token):
            raise Unauthorized("Unauthorized: No credentials provided or are invalid.")

    def _update_token(self, request: IRequest) -> str:
        try:
            return self._authorization(request, "update-token")
        except Unauthorized:
            raise Forbidden("Forbidden: an update token is required") from None

    async def _body(self, request: IRequest) -> dict[str, Any]:
        return await read_object(request, self.cpu, self.config.max_body_size)

    async def _offload(self, size: int, f: Callable[..., T], *args: Any) -> T:
        """Work proportional to a batch runs on the CPU pool unless the batch is small."""
        if size < INLINE_LIMIT:
            return f(*args)
        return await self.cpu.run(f, *args)


def query(request: IRequest) -> dict[str, str]:
    try:
        return {
            key.decode(): values[-1].decode()
            for key, values in (request.args or {}).items()
            if values
        }
    except UnicodeDecodeError:
        raise BadRequest("Bad Request: the query string is not valid UTF-8") from None


def int_arg(value: str) -> int:
    return parse_bounded_int(value, f"integer {value!r}")


def version_arg(value: str) -> int:
    number = parse_bounded_int(value, "version")
    if number < 1:
        raise BadRequest("Bad Request: the version must be a positive integer")
    return number
