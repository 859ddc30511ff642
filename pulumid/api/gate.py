"""The door: credentials are checked from the headers, before a request body is read.

A request that carries a body must present a credential that is valid somewhere: the access
token, or the token of an update (running or ended: the handler tells them apart). Otherwise
its body is discarded as it arrives (it costs no memory or disk) and the handler answers the
error. The handler still
makes the full check (this update, this stack, a live lease); the gate only keeps strangers
from making the daemon buffer, decompress or parse anything.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers

from pulumid.auth.tokens import hash_token, same
from pulumid.errors import Forbidden, PulumidError, Unauthorized
from pulumid.storage.interface import Store

Verdict = PulumidError | None

NO_CREDENTIALS = "Unauthorized: No credentials provided or are invalid."
BAD_UPDATE_TOKEN = "Forbidden: the update token is not valid for this update"


class Gate:
    def __init__(self, user_token: str, store: Store, cache_size: int = 4096) -> None:
        self._user_token = user_token
        self._store = store
        self._known: OrderedDict[str, None] = OrderedDict()  # hashes of update tokens
        self._cache_size = cache_size

    def check(self, headers: Headers) -> Verdict | Deferred[Verdict]:
        """None to accept the body, the error to answer, or a Deferred of either."""
        values = headers.getRawHeaders(b"authorization") or [b""]
        scheme, _, value = values[0].decode("latin-1").partition(" ")
        value = value.strip()
        scheme = scheme.lower()
        if scheme == "token" and value:
            return None if same(value, self._user_token) else Unauthorized(NO_CREDENTIALS)
        if scheme == "update-token" and value:
            token_hash = hash_token(value)
            if token_hash in self._known:
                self._known.move_to_end(token_hash)
                return None
            return Deferred.fromCoroutine(self._look_up(token_hash))
        return Unauthorized(NO_CREDENTIALS)

    async def _look_up(self, token_hash: str) -> Verdict:
        try:
            update = await self._store.find_update_by_token(token_hash)
        except PulumidError as e:
            return e
        if update is None:
            return Forbidden(BAD_UPDATE_TOKEN)
        self._known[token_hash] = None
        while len(self._known) > self._cache_size:
            self._known.popitem(last=False)
        return None
