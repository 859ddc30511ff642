"""Access tokens: people's own (create, list, revoke), admins' view of everyone's, and the
RFC 8693 exchange that gives CI jobs short-lived tokens."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from twisted.web.iweb import IRequest

from pulumid.api import shapes
from pulumid.api.base import Routes, route
from pulumid.api.http import json_response, no_content, read_body
from pulumid.auth.access import PUBLIC, SIGNED_IN, signed_in, site_admin
from pulumid.auth.exchange import OAuthError
from pulumid.auth.principal import Principal
from pulumid.auth.tokens import hash_token, new_token
from pulumid.errors import BadRequest, Forbidden, NotFound, PulumidError
from pulumid.storage.records import IdentityRecord, TokenRecord

FORM_LIMIT = 64 * 1024


# Anything later is a mistake (milliseconds for seconds) or beyond a float's exact range.
MAX_LIFETIME = 10 * 365 * 86400


class TokenRoutes(Routes):
    @route("/api/user/tokens", "GET", SIGNED_IN, answer=shapes.TOKENS)
    async def list_tokens(self, request: IRequest) -> bytes:
        caller = self._token_owner(request)
        tokens = await self.backend.store.list_tokens(caller.login)
        return json_response(request, {"tokens": [_view(t) for t in tokens]})

    @route(
        "/api/user/tokens",
        "POST",
        signed_in("token.create"),
        body=shapes.CREATE_TOKEN,
        answer=shapes.CREATED_TOKEN,
    )
    async def create_token(self, request: IRequest) -> bytes:
        caller = self._token_owner(request)
        body = await self._body(request)
        description = body.get("description", "")
        expires = body.get("expires", 0)
        if not isinstance(description, str) or len(description) > 1024:
            raise BadRequest("Bad Request: 'description' must be a string of at most 1024")
        if isinstance(expires, bool) or not isinstance(expires, int) or expires < 0:
            raise BadRequest("Bad Request: 'expires' must be epoch seconds (0: never)")
        now = self.backend.clock.seconds()
        if expires and expires <= now:
            raise BadRequest("Bad Request: 'expires' is in the past")
        if expires > now + MAX_LIFETIME:
            raise BadRequest("Bad Request: 'expires' is more than ten years away (0: never)")
        if caller.kind == "user":
            await self._remember(caller, now)
        value = "pul-" + new_token()
        record = TokenRecord(
            id=secrets.token_hex(16),
            token_hash=hash_token(value),
            login=caller.login,
            kind="personal",
            description=description,
            created=now,
            expires=float(expires),
        )
        await self.backend.store.create_token(record)
        return json_response(request, {"id": record.id, "tokenValue": value})

    @route("/api/user/tokens/<token_id>", "DELETE", signed_in("token.delete"))
    async def delete_token(self, request: IRequest, token_id: str) -> bytes:
        caller = self._token_owner(request)
        return await self._revoke(request, token_id, caller.login)

    @route("/api/admin/tokens", "GET", site_admin(), answer=shapes.TOKENS)
    async def all_tokens(self, request: IRequest) -> bytes:
        tokens = await self.backend.store.list_tokens(None)
        return json_response(request, {"tokens": [_view(t) for t in tokens]})

    @route("/api/admin/tokens/<token_id>", "DELETE", site_admin("token.delete"))
    async def revoke_any_token(self, request: IRequest, token_id: str) -> bytes:
        return await self._revoke(request, token_id, None)

    @route("/api/admin/google-groups-cache", "DELETE", site_admin("groups.refresh"))
    async def drop_groups_cache(self, request: IRequest) -> bytes:
        people = self.auth.people
        if people is None or people.workspace is None:
            raise NotFound("Not Found: no Workspace groups are read (google mode only)")
        dropped = people.workspace.drop_cache()
        changed = await people.refresh_groups()
        return json_response(request, {"dropped": dropped, "changed": changed})

    async def _revoke(self, request: IRequest, token_id: str, login: str | None) -> bytes:
        if not await self.backend.store.delete_token(token_id, login):
            raise NotFound(f"Not Found: no token {token_id!r}")
        # This node forgets it now; others within the authenticator's cache time.
        self.auth.authenticator.forget()
        return no_content(request)

    def _token_owner(self, request: IRequest) -> Principal:
        caller = self.principal(request)
        if caller.kind == "exchange":
            raise Forbidden("Forbidden: exchanged tokens cannot manage tokens")
        return caller

    async def _remember(self, caller: Principal, now: float) -> None:
        """Record who a JWT user is (their tokens act as this): their groups as of now."""
        known = await self.backend.store.get_identity(caller.login)
        groups = tuple(sorted(caller.groups))
        if known is not None and (known.provider != "jwt" or known.groups == groups):
            return
        await self.backend.store.put_identity(
            IdentityRecord(
                login=caller.login,
                name=caller.name,
                email=caller.email,
                groups=groups,
                provider=self.auth.mode,
                created=known.created if known else now,
                checked=now,
            )
        )
        self.auth.authenticator.forget_login(caller.login)

    # -- RFC 8693 -------------------------------------------------------------------------

    @route("/api/oauth/token", "POST", PUBLIC, answer=shapes.EXCHANGED)
    async def oauth_token(self, request: IRequest) -> bytes:
        exchange = self.auth.exchange
        if exchange is None:
            raise NotFound("Not Found: token exchange is not configured")
        try:
            raw = await read_body(request, self.cpu, FORM_LIMIT)
            fields = parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise OAuthError(400, "invalid_request", "the form is not valid UTF-8") from None
        except PulumidError as e:
            raise OAuthError(e.status, "invalid_request", e.message) from None
        form = {key: values[-1] for key, values in fields.items()}
        audience = form.get("audience", "")
        try:
            outcome = await exchange.exchange(form)
        except Exception as e:
            status = getattr(e, "status", 500)
            self._audit(request, None, "token.exchange", {"org": _org(audience)}, status)
            raise
        self.auth.audit.record(
            org=outcome.org,
            actor=outcome.subject,
            action="token.exchange",
            resource=outcome.org,
            status=200,
            client_ip=self.auth.client_ip(request),
            description=f"issuer {outcome.issuer}",
        )
        request.setHeader(b"cache-control", b"no-store")
        return json_response(request, outcome.response)


def _org(audience: str) -> str:
    return audience.removeprefix("urn:pulumi:org:") if audience.startswith("urn:pulumi:") else ""


def _view(token: TokenRecord) -> dict[str, Any]:
    return {
        "id": token.id,
        "name": token.description or token.id,
        "description": token.description,
        "created": datetime.fromtimestamp(token.created, UTC).isoformat().replace("+00:00", "Z"),
        "createdBy": token.login,
        "expires": int(token.expires),
        "lastUsed": int(token.last_used),
        "admin": False,
        "kind": token.kind,
    }
