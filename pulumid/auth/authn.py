"""Authentication: from an Authorization header to a Principal, or a clear refusal.

Accepted: `token <value>` (the CLI's scheme), where the value is the single-tenant token or a
stored access token (personal, browser login, exchanged; looked up by its SHA-256); in jwt
mode also a JWT the verifier accepts, as `token <jwt>` or `Bearer <jwt>`; and
`update-token <value>` for the update lifecycle. Stored tokens are cached for a few seconds so
a busy CLI costs no database read per request; revocation on this node drops the cache entry
at once, on other nodes within CACHE_SECONDS. Last-used times are kept in memory and written
in one batch by a timer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from pulumid.auth.principal import Principal
from pulumid.auth.roles import Role
from pulumid.auth.tokens import hash_token, same
from pulumid.errors import Forbidden, PulumidError, Unauthorized
from pulumid.storage.interface import Store
from pulumid.storage.records import TokenRecord

NO_CREDENTIALS = "Unauthorized: No credentials provided or are invalid."
BAD_UPDATE_TOKEN = "Forbidden: the update token is not valid for this update"
CACHE_SECONDS = 10.0

Outcome = Principal | Deferred[Principal]
# A JWT verifier: the token to (login, name, email, groups, expiry) or Unauthorized.
JWTCheck = Callable[[str], Deferred[Principal]]


def looks_like_jwt(value: str) -> bool:
    parts = value.split(".")
    return len(parts) == 3 and all(parts) and value.startswith("eyJ")


class Authenticator:
    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        site_token: str,
        site_login: str,
        multi_user: bool,
        jwt_check: JWTCheck | None = None,
        cache_size: int = 4096,
    ) -> None:
        self._store = store
        self._clock = clock
        self._site_token = site_token
        self.site_login = site_login
        self._multi_user = multi_user
        self._jwt_check = jwt_check
        self._cache_size = cache_size
        self._update_hashes: OrderedDict[str, None] = OrderedDict()
        self._tokens: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._last_used: dict[str, float] = {}

    @property
    def site(self) -> Principal:
        return Principal("site", self.site_login, name=self.site_login)

    def check(self, headers: Headers) -> Outcome:
        """The caller, a Deferred of it, or raise Unauthorized / Forbidden."""
        values = headers.getRawHeaders(b"authorization") or [b""]
        scheme, _, raw = values[0].decode("latin-1").partition(" ")
        value, scheme = raw.strip(), scheme.lower()
        if not value:
            raise Unauthorized(NO_CREDENTIALS)
        if scheme == "update-token":
            return self._update_token(value)
        if self._jwt_check is not None and scheme in ("token", "bearer") and looks_like_jwt(value):
            return self._jwt_check(value)
        if scheme != "token":
            raise Unauthorized(NO_CREDENTIALS)
        if not self._multi_user and self._site_token and same(value, self._site_token):
            return self.site
        return self._stored(hash_token(value))

    async def principal(self, request: Any) -> Principal:
        """The caller of a route that takes access tokens (not update tokens), authenticated
        once per request (the gate may have done it)."""
        known = getattr(request, "principal", None)
        if known is not None and known.kind != "update":
            return known  # type: ignore[no-any-return]
        header = (request.getHeader("authorization") or "").lstrip()
        if known is not None or header[:13].lower() == "update-token ":
            raise Unauthorized(NO_CREDENTIALS)
        outcome = self.check(request.requestHeaders)
        found = await outcome if isinstance(outcome, Deferred) else outcome
        request.principal = found
        return found

    # -- update tokens ----------------------------------------------------------------------

    def _update_token(self, value: str) -> Outcome:
        token_hash = hash_token(value)
        principal = Principal("update", "", update_token_hash=token_hash)
        if token_hash in self._update_hashes:
            self._update_hashes.move_to_end(token_hash)
            return principal
        return Deferred.fromCoroutine(self._look_up_update(token_hash, principal))

    async def _look_up_update(self, token_hash: str, principal: Principal) -> Principal:
        if await self._store.find_update_by_token(token_hash) is None:
            raise Forbidden(BAD_UPDATE_TOKEN)
        self._update_hashes[token_hash] = None
        while len(self._update_hashes) > self._cache_size:
            self._update_hashes.popitem(last=False)
        return principal

    # -- stored access tokens ---------------------------------------------------------------

    def _stored(self, token_hash: str) -> Outcome:
        now = self._clock.seconds()
        cached = self._tokens.get(token_hash)
        if cached is not None and cached[1] > now:
            return self._use(cached[0], now)
        return Deferred.fromCoroutine(self._look_up_token(token_hash, now))

    async def _look_up_token(self, token_hash: str, now: float) -> Principal:
        record = await self._store.find_token(token_hash)
        # The index found it by hash; the comparison that decides is constant-time.
        if record is None or not same(record.token_hash, token_hash):
            raise Unauthorized(NO_CREDENTIALS)
        principal = await self._principal_of(record)
        self._tokens[token_hash] = (principal, now + CACHE_SECONDS)
        while len(self._tokens) > self._cache_size:
            self._tokens.popitem(last=False)
        return self._use(principal, now)

    def _use(self, principal: Principal, now: float) -> Principal:
        if principal.expires and principal.expires <= now:
            raise Unauthorized("Unauthorized: the access token has expired")
        self._last_used[principal.token_id] = now
        return principal

    async def _principal_of(self, record: TokenRecord) -> Principal:
        common: dict[str, Any] = {
            "token_id": record.id,
            "token_name": record.description,
            "expires": record.expires,
        }
        if record.kind == "exchange":
            grants = {record.org: Role.parse(record.role, "token")}
            shown = record.login.removeprefix("exchange:")  # the organization or org/team
            return Principal("exchange", record.login, name=shown, grants=grants, **common)
        if not self._multi_user:
            return Principal("site", self.site_login, name=self.site_login, **common)
        identity = await self._store.get_identity(record.login)
        if identity is None or identity.disabled:
            raise Unauthorized(f"Unauthorized: {record.login} may no longer sign in")
        return Principal(
            "user",
            identity.login,
            name=identity.name,
            email=identity.email,
            groups=frozenset(identity.groups),
            **common,
        )

    def forget(self, token_hash: str | None = None) -> None:
        """Drop cached tokens (one, or all: after a revocation or a deactivation)."""
        if token_hash is None:
            self._tokens.clear()
        else:
            self._tokens.pop(token_hash, None)

    def forget_login(self, login: str) -> None:
        for key in [k for k, (p, _) in self._tokens.items() if p.login == login]:
            del self._tokens[key]

    async def flush_last_used(self) -> int:
        """Write the last-used times gathered since the previous flush, in one transaction."""
        pending, self._last_used = self._last_used, {}
        if not pending:
            return 0
        try:
            await self._store.touch_tokens(pending)
        except PulumidError:
            for key, value in pending.items():  # keep them for the next flush
                self._last_used[key] = max(value, self._last_used.get(key, 0.0))
            raise
        return len(pending)
