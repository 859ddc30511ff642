"""The door: credentials are checked from the headers, before a request body is read.

A request that carries a body must present a credential that is valid somewhere: an access
token of any kind, or the token of an update (running or ended: the handler tells them
apart). Otherwise its body is discarded as it arrives (it costs no memory or disk) and the
handler answers the error. The caller found here is kept on the request, so the route's own
check (pulumid.auth.access) does not authenticate twice. A few public routes take small
bodies without credentials (the token exchange).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from pulumid.auth.authn import Authenticator
from pulumid.auth.principal import Principal
from pulumid.errors import PulumidError, TooLarge

Verdict = PulumidError | None

# Routes that take a body from callers without credentials, and the most they may send.
PUBLIC_BODIES = {b"/api/oauth/token": 64 * 1024}


class Gate:
    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    def check(self, request: Any, length: int | None) -> Verdict | Deferred[Verdict]:
        """None to accept the body, the error to answer, or a Deferred of either."""
        # The path is parsed only after the body; the channel has it from the request line.
        path = getattr(getattr(request, "channel", None), "_path", b"") or b""
        public_limit = PUBLIC_BODIES.get(path.split(b"?", 1)[0])
        if public_limit is not None:
            # Also cuts a chunked body off at the limit as it arrives.
            request.max_body_size = public_limit
            if length is not None and length > public_limit:
                return TooLarge(f"Payload Too Large: the request body exceeds {public_limit} bytes")
            return None
        try:
            outcome = self._authenticator.check(request.requestHeaders)
        except PulumidError as e:
            return e
        if isinstance(outcome, Deferred):
            return Deferred.fromCoroutine(self._settle(request, outcome))
        request.principal = outcome
        return None

    async def _settle(self, request: Any, outcome: Deferred[Principal]) -> Verdict:
        try:
            request.principal = await outcome
        except PulumidError as e:
            return e
        return None
