"""Verifying JWTs: signature by a fixed key or a JWKS (refetched when keys rotate), then
issuer, audience and times against the daemon's clock (so tests can move it).

pyjwt does the cryptography; the key fetching is ours so it runs on the reactor (treq), and
the time checks are ours so they use IReactorTime.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import jwt
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pulumid.errors import Unauthorized

# Asymmetric algorithms only for published keys; HMAC only for a configured secret.
PUBLIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384")
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")

# GET URL -> JSON body (raises on failure); treq in the daemon, anything in tests.
Fetch = Callable[[str], Awaitable[Any]]

log = Logger()


class InvalidToken(Unauthorized):
    def __init__(self, why: str) -> None:
        super().__init__(f"Unauthorized: {why}")


class StaticKey:
    """One configured key: an HMAC secret or a PEM public key."""

    def __init__(self, key: str, algorithms: Sequence[str]) -> None:
        self.key = key
        self.algorithms = tuple(algorithms)

    @classmethod
    def secret(cls, secret: str) -> StaticKey:
        return cls(secret, HMAC_ALGORITHMS)

    @classmethod
    def public(cls, pem: str) -> StaticKey:
        return cls(pem, PUBLIC_ALGORITHMS)

    async def key_for(self, kid: str | None, alg: str) -> Any:
        return self.key


class JWKSKeys:
    """Keys from a JWKS URL. An unknown `kid` refetches the set (at most every MIN_REFETCH
    seconds, so forged kids cannot make us hammer the provider); the set is refreshed anyway
    after MAX_AGE seconds, so retired keys stop working."""

    MIN_REFETCH = 10.0
    MAX_AGE = 3600.0
    algorithms = PUBLIC_ALGORITHMS

    def __init__(self, url: str | Callable[[], Awaitable[str]], fetch: Fetch, clock: IReactorTime):
        self._url = url
        self._fetch = fetch
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched = float("-inf")
        self._unreachable = False

    async def key_for(self, kid: str | None, alg: str) -> Any:
        now = self._clock.seconds()
        if now - self._fetched > self.MAX_AGE:
            await self._refresh(now)
        key = self._pick(kid, alg)
        if key is None and now - self._fetched >= self.MIN_REFETCH:
            await self._refresh(now)
            key = self._pick(kid, alg)
        if key is None and self._unreachable:
            raise InvalidToken("the issuer's signing keys cannot be fetched")
        if key is None:
            raise InvalidToken(f"the token's signing key {kid!r} is not one of the issuer's keys")
        return key.key

    def _pick(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        if kid is not None:
            return self._keys.get(kid)
        usable = [k for k in self._keys.values() if getattr(k, "algorithm_name", alg) == alg]
        return usable[0] if len(usable) == 1 else None

    async def _refresh(self, now: float) -> None:
        url = self._url if isinstance(self._url, str) else "(from discovery)"
        try:
            if not isinstance(self._url, str):
                url = await self._url()
            document = await self._fetch(url)
            keys: dict[str, jwt.PyJWK] = {}
            for entry in document.get("keys", []):
                if entry.get("use", "sig") != "sig":
                    continue
                try:
                    key = jwt.PyJWK(entry)
                except jwt.PyJWTError:
                    continue  # a key type we do not use
                keys[str(entry.get("kid", ""))] = key
        except Exception as e:
            log.warn("cannot read the JWKS at {url}: {error}", url=url, error=e)
            # A failure counts as a fetch too: a dead JWKS is not asked again per request.
            self._fetched = now
            if not self._keys:
                self._unreachable = True
                raise InvalidToken("the issuer's signing keys cannot be fetched") from None
            return  # keep the keys we had
        self._keys, self._fetched, self._unreachable = keys, now, False


class JWTVerifier:
    def __init__(
        self,
        keys: StaticKey | JWKSKeys,
        clock: IReactorTime,
        issuer: str = "",
        audience: str = "",
        leeway: float = 30.0,
    ) -> None:
        self._keys = keys
        self._clock = clock
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway

    async def verify(self, token: str, nonce: str | None = None) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("the token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in self._keys.algorithms:
            raise InvalidToken(f"tokens signed with {alg!r} are not accepted")
        key = await self._keys.key_for(header.get("kid"), alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise InvalidToken("the token's signature does not verify") from None
        except jwt.PyJWTError as e:
            raise InvalidToken(f"the token is not valid: {e}") from None
        self.check_claims(claims, nonce)
        return claims

    def check_claims(self, claims: Mapping[str, Any], nonce: str | None = None) -> None:
        now = self._clock.seconds()
        exp = _number(claims, "exp", required=True)
        if exp is not None and exp + self.leeway < now:
            raise InvalidToken("the token has expired")
        nbf = _number(claims, "nbf")
        if nbf is not None and nbf - self.leeway > now:
            raise InvalidToken("the token is not valid yet")
        iat = _number(claims, "iat")
        if iat is not None and iat - self.leeway > now:
            raise InvalidToken("the token was issued in the future")
        if self.issuer and claims.get("iss") != self.issuer:
            raise InvalidToken(f"the token's issuer {claims.get('iss')!r} is not trusted")
        if self.audience:
            audience = claims.get("aud")
            audiences = audience if isinstance(audience, list) else [audience]
            if self.audience not in audiences:
                raise InvalidToken(f"the token is not meant for this audience ({audience!r})")
        if nonce is not None and claims.get("nonce") != nonce:
            raise InvalidToken("the token's nonce does not match the sign-in")


def _number(claims: Mapping[str, Any], name: str, required: bool = False) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise InvalidToken(f"the token has no {name!r} claim")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"the token's {name!r} claim is not a number")
    return float(value)


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims, unchecked: only to choose which issuer's keys to check it with."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise InvalidToken("the token is not a well-formed JWT") from None
    if not isinstance(claims, dict):
        raise InvalidToken("the token is not a well-formed JWT")
    return claims


def claim_strings(value: Any) -> tuple[str, ...]:
    """A groups-like claim as strings: a list, or one space/comma-separated string."""
    if isinstance(value, str):
        return tuple(p for p in value.replace(",", " ").split() if p)
    if isinstance(value, list):
        return tuple(str(v) for v in value if isinstance(v, str | int) and str(v))
    return ()


def principal_of(claims: Mapping[str, Any], username_claim: str, groups_claim: str) -> Any:
    """The person a verified token names: login from USERNAME_CLAIM (else `sub`)."""
    from pulumid.auth.principal import Principal

    login = claims.get(username_claim) or claims.get("sub")
    if not isinstance(login, str) or not login.strip():
        raise InvalidToken(f"the token names nobody (no {username_claim!r} or 'sub' claim)")
    email = claims.get("email")
    name = claims.get("name")
    return Principal(
        "user",
        login.strip(),
        name=name if isinstance(name, str) else login.strip(),
        email=email if isinstance(email, str) else "",
        groups=frozenset(claim_strings(claims.get(groups_claim))),
        expires=float(claims.get("exp") or 0),
    )
