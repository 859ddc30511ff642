"""RFC 8693 token exchange: a CI job trades its platform's OIDC token for a pulumid token.

What `pulumi login --oidc-token T --oidc-org O [--oidc-team X]` posts to /api/oauth/token:
audience=urn:pulumi:org:O, grant_type=...:token-exchange, subject_token_type=...:id_token,
requested_token_type=urn:pulumi:token-type:access_token:{organization|team|personal},
scope ("" / "team:X" / "user:U"), expiration (seconds). The subject token's issuer must be
listed in the RBAC file with the audience it must carry; the first rule for the organization
that admits its subject and claims gives the role. The new token lives for the asked
expiration, capped by the rule, and is stored hashed like every other token.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from pulumid.auth.jwt import Fetch, JWKSKeys, JWTVerifier, unverified_claims
from pulumid.auth.rbac import Policy, TrustedIssuer
from pulumid.auth.tokens import hash_token, new_token
from pulumid.errors import PulumidError, Unauthorized
from pulumid.storage.interface import Store
from pulumid.storage.records import TokenRecord

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
SUBJECT_TYPES = (
    "urn:ietf:params:oauth:token-type:id_token",
    "urn:ietf:params:oauth:token-type:jwt",
)
TOKEN_TYPE = "urn:pulumi:token-type:access_token:"
AUDIENCE = "urn:pulumi:org:"
DEFAULT_LIFETIME = 7200
EXCHANGED = "exchange:"  # prefix of the login of every exchanged token


class OAuthError(PulumidError):
    """An OAuth error: the house {"code","message"} body plus RFC 6749's error fields."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}", status=status)
        self.error = error
        self.description = description

    def body(self) -> dict[str, Any]:
        return {
            "code": self.status,
            "message": self.message,
            "error": self.error,
            "error_description": self.description,
        }


@dataclass(frozen=True)
class Exchanged:
    response: dict[str, Any]
    subject: str
    issuer: str
    org: str


class TokenExchange:
    def __init__(
        self, policy: Callable[[], Policy], store: Store, clock: IReactorTime, fetch: Fetch
    ) -> None:
        self._policy = policy
        self._store = store
        self._clock = clock
        self._fetch = fetch
        self._verifiers: dict[tuple[str, str, str], JWTVerifier] = {}

    async def exchange(self, form: Mapping[str, str]) -> Exchanged:
        if form.get("grant_type") != GRANT:
            raise OAuthError(
                400, "unsupported_grant_type", f"grant_type must be {GRANT} (no refresh tokens)"
            )
        if form.get("subject_token_type") not in SUBJECT_TYPES:
            raise OAuthError(400, "invalid_request", "subject_token_type must be an ID token")
        audience = form.get("audience", "")
        org = audience[len(AUDIENCE) :] if audience.startswith(AUDIENCE) else ""
        if not org:
            raise OAuthError(400, "invalid_target", f"audience must be {AUDIENCE}<organization>")
        kind, scope = self._kind(form)
        lifetime = self._lifetime(form.get("expiration", ""))
        token = form.get("subject_token", "")
        try:
            claims = unverified_claims(token)
        except Unauthorized:
            raise OAuthError(400, "invalid_request", "subject_token is not a JWT") from None
        issuer = self._issuer(claims)
        try:
            claims = await self._verifier(issuer).verify(token)
        except Unauthorized as e:
            why = e.message.removeprefix("Unauthorized: ")
            raise OAuthError(401, "invalid_grant", why) from None
        subject = str(claims.get("sub", ""))
        rule = next((r for r in issuer.rules if r.organization == org and r.admits(claims)), None)
        if rule is None:
            raise OAuthError(
                403,
                "access_denied",
                f"no rule for issuer {issuer.issuer} admits subject {subject!r} "
                f"in organization {org!r}",
            )
        now = self._clock.seconds()
        lifetime = int(min(lifetime, rule.max_lifetime))
        value = "pul-" + new_token()
        # A namespace of their own: the job chooses the team name, and must not be able to
        # pass for a person (whose tokens, audit trail and admin rights are theirs).
        login = EXCHANGED + (f"{org}/{scope.removeprefix('team:')}" if kind == "team" else org)
        await self._store.create_token(
            TokenRecord(
                id=secrets.token_hex(16),
                token_hash=hash_token(value),
                login=login,
                kind="exchange",
                description=f"exchanged from {issuer.issuer} for {subject}"[:200],
                created=now,
                expires=now + lifetime,
                org=org,
                role=rule.role.label,
            )
        )
        response = {
            "access_token": value,
            "issued_token_type": TOKEN_TYPE + kind,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": scope,
        }
        return Exchanged(response, subject, issuer.issuer, org)

    @staticmethod
    def _kind(form: Mapping[str, str]) -> tuple[str, str]:
        requested = form.get("requested_token_type", "")
        kind = requested.removeprefix(TOKEN_TYPE) if requested.startswith(TOKEN_TYPE) else ""
        scope = form.get("scope", "")
        if kind == "organization" and not scope:
            return kind, scope
        if kind == "team" and scope.startswith("team:") and len(scope) > 5:
            return kind, scope
        if kind == "personal":
            raise OAuthError(
                400,
                "invalid_request",
                "personal tokens are not issued by exchange: ask for an organization or team "
                "token (--oidc-org, --oidc-team)",
            )
        raise OAuthError(400, "invalid_request", f"unsupported requested_token_type {requested!r}")

    @staticmethod
    def _lifetime(raw: str) -> int:
        if not raw:
            return DEFAULT_LIFETIME
        if not raw.isdigit() or not 0 < int(raw) <= 31 * 86400:
            raise OAuthError(400, "invalid_request", "expiration must be 1 to 2678400 seconds")
        return int(raw)

    def _issuer(self, claims: Mapping[str, Any]) -> TrustedIssuer:
        iss = claims.get("iss")
        for issuer in self._policy().issuers:
            if issuer.issuer == iss:
                return issuer
        raise OAuthError(401, "invalid_grant", f"the token's issuer {iss!r} is not trusted")

    def _verifier(self, issuer: TrustedIssuer) -> JWTVerifier:
        key = (issuer.issuer, issuer.audience, issuer.jwks_url)
        verifier = self._verifiers.get(key)
        if verifier is None:
            url: Any = issuer.jwks_url or self._discover(issuer.issuer)
            keys = JWKSKeys(url, self._fetch, self._clock)
            verifier = JWTVerifier(keys, self._clock, issuer.issuer, issuer.audience, leeway=30)
            self._verifiers[key] = verifier
        return verifier

    def _discover(self, issuer: str) -> Callable[[], Any]:
        async def jwks_uri() -> str:
            document = await self._fetch(f"{issuer}/.well-known/openid-configuration")
            uri = document.get("jwks_uri") if isinstance(document, dict) else None
            if not isinstance(uri, str):
                raise ValueError(f"the issuer {issuer} publishes no jwks_uri")
            return uri

        return jwks_uri
