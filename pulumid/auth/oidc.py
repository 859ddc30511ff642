"""Signing in through an OpenID Connect provider: the authorization code flow with PKCE.

Nothing about a sign-in in progress is kept on the server: the PKCE verifier, the OIDC nonce,
the CLI's port and nonce travel in `state`, sealed (AES-GCM) with a key derived from the master
key, so any node can finish what another began. A cookie binds the sign-in to the browser
that started it (its hash is sealed in the state), so a link cannot sign someone else in.

The provider's refresh token is kept encrypted; `recheck` uses it on a schedule, and a user the
provider no longer knows (invalid_grant) is disabled: their tokens stop working at once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pulumid.auth.jwt import Fetch, JWKSKeys, JWTVerifier, claim_strings
from pulumid.config import AuthConfig
from pulumid.errors import BadRequest, Forbidden, PulumidError, Unavailable
from pulumid.secrets import crypto

GOOGLE_ISSUER = "https://accounts.google.com"
STATE_SECONDS = 600.0
CALLBACK = "/login/callback"
COOKIE = "pulumid_signin"

# POST a form to URL with HTTP basic client credentials -> (status, JSON body or {}).
Post = Callable[[str, Mapping[str, str], tuple[str, str]], Awaitable[tuple[int, Any]]]

log = Logger()


class SignInRefused(Forbidden):
    """The provider or our rules said no; the message says why (shown to the user)."""


class Revoked(PulumidError):
    """The provider no longer accepts the user's refresh token (invalid_grant)."""


@dataclass(frozen=True)
class CLISession:
    port: int
    nonce: str
    description: str


@dataclass(frozen=True)
class SignIn:
    login: str
    name: str
    email: str
    groups: tuple[str, ...]
    refresh_token: str | None
    cli: CLISession


class Sealer:
    """Seals small JSON values with a key of their own, derived from the site key (a data
    key wrapped by the keyring: rotation re-wraps it, so what is sealed stays readable)."""

    def __init__(self, root: bytes, purpose: bytes) -> None:
        self._key = crypto.derive_key(root, purpose)
        self._purpose = purpose

    def seal(self, value: Any) -> str:
        blob = crypto.encrypt_value(self._key, json.dumps(value).encode(), context=self._purpose)
        return base64.urlsafe_b64encode(blob).decode().rstrip("=")

    def open(self, text: str) -> Any:
        try:
            blob = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            return json.loads(crypto.decrypt_value(self._key, blob, context=self._purpose))
        except (ValueError, crypto.DecryptionError):
            raise BadRequest("Bad Request: the sign-in state is not valid") from None

    def seal_bytes(self, data: bytes, context: bytes) -> bytes:
        return crypto.encrypt_value(self._key, data, context=self._purpose + b":" + context)

    def open_bytes(self, blob: bytes, context: bytes) -> bytes:
        return crypto.decrypt_value(self._key, blob, context=self._purpose + b":" + context)


class OIDCClient:
    def __init__(
        self,
        settings: AuthConfig,
        clock: IReactorTime,
        fetch: Fetch,
        post: Post,
        sealer: Sealer,
    ) -> None:
        self.settings = settings
        self.google = settings.mode == "google"
        # --oidc-issuer may name another issuer in google mode too (a test double, a proxy).
        self.issuer = settings.oidc_issuer or GOOGLE_ISSUER
        self._clock = clock
        self._fetch = fetch
        self._post = post
        self._sealer = sealer
        self._discovery: dict[str, Any] | None = None
        self._verifier = JWTVerifier(
            JWKSKeys(self._jwks_uri, fetch, clock),
            clock,
            issuer=self.issuer,
            audience=settings.oidc_client_id,
            leeway=60.0,
        )

    @property
    def redirect_uri(self) -> str:
        return self.settings.public_url + CALLBACK

    async def discovery(self) -> dict[str, Any]:
        if self._discovery is None:
            try:
                document = await self._fetch(f"{self.issuer}/.well-known/openid-configuration")
            except Exception as e:
                raise Unavailable(f"Service Unavailable: the identity provider: {e}") from None
            if not isinstance(document, dict) or document.get("issuer") != self.issuer:
                raise Unavailable("Service Unavailable: the provider's discovery does not match")
            self._discovery = document
        return self._discovery

    async def _jwks_uri(self) -> str:
        return str((await self.discovery())["jwks_uri"])

    # -- the code flow --------------------------------------------------------------------

    async def begin(self, cli: CLISession) -> tuple[str, str]:
        """(the provider's authorization URL, the browser-binding cookie value)."""
        document = await self.discovery()
        verifier = secrets.token_urlsafe(48)
        challenge = _b64(hashlib.sha256(verifier.encode()).digest())
        nonce = secrets.token_urlsafe(16)
        binding = secrets.token_urlsafe(24)
        state = self._sealer.seal(
            {
                "v": verifier,
                "n": nonce,
                "b": _b64(hashlib.sha256(binding.encode()).digest()),
                "exp": self._clock.seconds() + STATE_SECONDS,
                "p": cli.port,
                "cn": cli.nonce,
                "d": cli.description,
            }
        )
        scopes = self.settings.oidc_scopes.split()
        if "offline_access" not in scopes and not self.google:
            scopes.append("offline_access")
        params = {
            "response_type": "code",
            "client_id": self.settings.oidc_client_id,
            "redirect_uri": self.redirect_uri,
            "scope": " ".join(scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        if self.google:
            # Google issues refresh tokens only with these; hd preselects the domain.
            params.update({"access_type": "offline", "prompt": "consent"})
        endpoint = str(document["authorization_endpoint"])
        separator = "&" if "?" in endpoint else "?"
        return f"{endpoint}{separator}{urlencode(params)}", binding

    async def finish(self, code: str, state: str, binding: str) -> SignIn:
        sealed = self._sealer.open(state)
        if not isinstance(sealed, dict) or sealed.get("exp", 0) < self._clock.seconds():
            raise BadRequest("Bad Request: the sign-in took too long; start again")
        if not binding or _b64(hashlib.sha256(binding.encode()).digest()) != sealed.get("b"):
            raise BadRequest(
                "Bad Request: this sign-in was started in another browser; start again here"
            )
        document = await self.discovery()
        status, body = await self._post(
            str(document["token_endpoint"]),
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.redirect_uri,
                "code_verifier": sealed["v"],
            },
            (self.settings.oidc_client_id, self.settings.oidc_client_secret),
        )
        if status != 200 or not isinstance(body, dict) or "id_token" not in body:
            why = (
                body.get("error_description") or body.get("error") if isinstance(body, dict) else ""
            )
            raise SignInRefused(f"Forbidden: the identity provider refused the sign-in: {why}")
        claims = await self._verifier.verify(str(body["id_token"]), nonce=sealed["n"])
        login, name, email, groups = self.identity(claims)
        cli = CLISession(int(sealed["p"]), str(sealed["cn"]), str(sealed["d"]))
        refresh = body.get("refresh_token")
        return SignIn(
            login, name, email, groups, refresh if isinstance(refresh, str) else None, cli
        )

    def identity(self, claims: Mapping[str, Any]) -> tuple[str, str, str, tuple[str, ...]]:
        """(login, name, email, groups) of verified claims, or SignInRefused."""
        settings = self.settings
        raw_email = claims.get("email")
        email = raw_email if isinstance(raw_email, str) else ""
        if email and claims.get("email_verified") is False:
            raise SignInRefused(f"Forbidden: the provider has not verified {email}")
        domains = [d.strip().lower() for d in settings.oidc_allowed_domains.split(",") if d.strip()]
        if domains and email.rpartition("@")[2].lower() not in domains:
            raise SignInRefused(f"Forbidden: {email or 'this account'} is not in an allowed domain")
        if self.google:
            hosted = [
                d.strip().lower() for d in settings.google_hosted_domains.split(",") if d.strip()
            ]
            if str(claims.get("hd", "")).lower() not in hosted:
                raise SignInRefused("Forbidden: this Google account is not in an allowed domain")
        login = claims.get(settings.username_claim) or claims.get("sub")
        if not isinstance(login, str) or not login:
            raise SignInRefused(f"Forbidden: the provider sent no {settings.username_claim!r}")
        name = claims.get("name") if isinstance(claims.get("name"), str) else login
        groups = claim_strings(claims.get(settings.groups_claim))
        return login, str(name), str(email), tuple(sorted(set(groups)))

    # -- later checks ---------------------------------------------------------------------

    async def refresh(self, refresh_token: str) -> tuple[dict[str, Any] | None, str | None]:
        """(verified claims of a new ID token if one came, the new refresh token if rotated).
        Revoked when the provider refuses the grant; other failures raise Unavailable."""
        document = await self.discovery()
        status, body = await self._post(
            str(document["token_endpoint"]),
            {"grant_type": "refresh_token", "refresh_token": refresh_token},
            (self.settings.oidc_client_id, self.settings.oidc_client_secret),
        )
        if status in (400, 401) and isinstance(body, dict) and body.get("error") == "invalid_grant":
            raise Revoked(str(body.get("error_description") or "invalid_grant"))
        if status != 200 or not isinstance(body, dict):
            raise Unavailable(f"Service Unavailable: the provider answered {status} to a refresh")
        claims = None
        if isinstance(body.get("id_token"), str):
            claims = await self._verifier.verify(body["id_token"])
        rotated = body.get("refresh_token")
        return claims, rotated if isinstance(rotated, str) else None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")
