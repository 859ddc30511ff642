"""What every group of routes shares: the one router, auth, bodies, the error mapping.

Each area of the API (identity, stacks, secrets, updates) is a class of its own module that
routes on the same Klein app; pulumid.api.app composes them into one API.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any, TypeVar

from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from pulumid.api.http import INLINE_LIMIT, error_response, read_object
from pulumid.auth.access import Need
from pulumid.auth.principal import Principal
from pulumid.auth.service import Auth
from pulumid.engine.backend import Backend, parse_bounded_int
from pulumid.errors import BadRequest, Forbidden, PulumidError, Unauthorized

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
H = TypeVar("H", bound=Callable[..., Any])

# Every route, by endpoint name: what it needs (pulumid.auth.access). Tests walk it.
NEEDS: dict[str, Need] = {}


# Declared JSON shapes by endpoint: (request body, 2xx answer), for GET /api/openapi.
SHAPES: dict[str, tuple[dict[str, Any] | None, dict[str, Any] | None]] = {}


def route(
    path: str,
    method: str,
    need: Need,
    body: dict[str, Any] | None = None,
    answer: dict[str, Any] | None = None,
) -> Callable[[H], H]:
    """Route METHOD PATH to the handler once the caller has been authorized for NEED.

    The need is declared here, at the route; Access decides, in one place, for every route.
    BODY and ANSWER describe the JSON shapes (pulumid.api.shapes) for the OpenAPI document.
    """

    def decorate(handler: H) -> H:
        @functools.wraps(handler)
        async def guarded(self: Routes, request: IRequest, **params: str) -> Any:
            request.route = template  # type: ignore[attr-defined]  # metrics, access log
            return await self._run(handler, need, request, params)

        endpoint = f"{handler.__name__}:{method}"
        template = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", path)  # <any(..):kind> -> {kind}
        NEEDS[endpoint] = need
        SHAPES[endpoint] = (body, answer)
        app.route(path, methods=[method], endpoint=endpoint)(guarded)
        return guarded  # type: ignore[return-value]

    return decorate


class Routes:
    app = app

    def __init__(self, backend: Backend, auth: Auth) -> None:
        self.backend = backend
        self.config = backend.config
        self.cpu = backend.cpu
        self.auth = auth

    def resource(self) -> IResource:
        return self.app.resource()

    # -- errors ---------------------------------------------------------------------------

    @app.handle_errors(Exception)
    def _errors(self, request: IRequest, failure: Failure) -> bytes:
        return error_response(request, failure)

    # -- auth -----------------------------------------------------------------------------

    async def _run(
        self, handler: Callable[..., Any], need: Need, request: IRequest, params: dict[str, str]
    ) -> Any:
        tracing = self.backend.tracing
        if tracing is None:
            return await self._serve(handler, need, request, params)
        method = request.method.decode("ascii", "replace")
        headers = {
            k.decode("latin-1").lower(): v[0].decode("latin-1")
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        with tracing.request(method, getattr(request, "route", ""), headers) as span:
            try:
                return await self._serve(handler, need, request, params)
            finally:
                span.set_attribute("http.response.status_code", getattr(request, "code", 0))

    async def _serve(
        self, handler: Callable[..., Any], need: Need, request: IRequest, params: dict[str, str]
    ) -> Any:
        auth = self.auth
        principal: Principal | None = None
        if need.scope not in ("public", "update"):
            try:
                principal = await auth.authenticator.principal(request)
                auth.access.decide(principal, need, params)
            except PulumidError as e:
                self._audit(request, principal, need.action or "access", params, e.status)
                raise
        result = handler(self, request, **params)
        if not need.action:
            return await result if inspect.isawaitable(result) else result
        try:
            result = await result if inspect.isawaitable(result) else result
        except Exception as e:
            status = e.status if isinstance(e, PulumidError) else 500
            self._audit(request, principal, need.action, params, status)
            raise
        self._audit(request, principal, need.action, params, getattr(request, "code", 200))
        return result

    def _audit(
        self,
        request: IRequest,
        principal: Principal | None,
        action: str,
        params: dict[str, str],
        status: int,
        description: str = "",
    ) -> None:
        org = params.get("org", "")
        parts = [params[k] for k in ("org", "project", "stack") if k in params]
        resource = "/".join(parts) or request.path.decode("utf-8", "replace")
        self.auth.audit.record(
            org=org,
            actor=principal.login if principal else "",
            action=action,
            resource=resource,
            status=status,
            client_ip=self.auth.client_ip(request),
            description=description,
            auth_failure=status == 401,
        )

    @staticmethod
    def principal(request: IRequest) -> Principal:
        """The caller that the route's need admitted (routes that need a signed-in caller)."""
        found: Principal | None = getattr(request, "principal", None)
        if found is None:
            raise Unauthorized("Unauthorized: No credentials provided or are invalid.")
        return found

    def _update_token(self, request: IRequest) -> str:
        header = request.getHeader("authorization") or ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "update-token" or not value.strip():
            raise Forbidden("Forbidden: an update token is required")
        return value.strip()

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
