"""Google Workspace groups of a signed-in person, for the google mode's roles.

Google's ID tokens carry no groups. A service account with domain-wide delegation reads them
from the Admin SDK Directory API (groups.list with userKey) acting as a Workspace admin: a
JWT assertion signed with the account's key buys an access token (RFC 7523), cached until
shortly before it expires. Each person's groups are cached for CACHE_SECONDS; admins drop the
cache (DELETE /api/admin/google-groups-cache) to apply a change at once.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
from twisted.internet.interfaces import IReactorTime

from pulumid.errors import Unavailable

DIRECTORY = "https://admin.googleapis.com/admin/directory/v1"
SCOPE = "https://www.googleapis.com/auth/admin.directory.group.readonly"
GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CACHE_SECONDS = 600.0
MAX_PAGES = 50

# GET url with headers -> (status, JSON); POST form -> (status, JSON). treq in the daemon.
Get = Callable[[str, Mapping[str, str]], Awaitable[tuple[int, Any]]]
PostForm = Callable[[str, Mapping[str, str]], Awaitable[tuple[int, Any]]]


class ServiceAccount:
    """The fields of a service account key file that the assertion needs."""

    def __init__(self, info: Mapping[str, Any]) -> None:
        try:
            self.email = str(info["client_email"])
            self.private_key = str(info["private_key"])
            self.key_id = str(info.get("private_key_id", ""))
            self.token_uri = str(info.get("token_uri") or "https://oauth2.googleapis.com/token")
        except KeyError as e:
            raise ValueError(f"the service account key file has no {e.args[0]!r}") from None

    @classmethod
    def load(cls, path: str) -> ServiceAccount:
        try:
            return cls(json.loads(Path(path).read_text()))
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None
        except json.JSONDecodeError:
            raise ValueError(f"{path} is not a JSON key file") from None


class WorkspaceGroups:
    def __init__(
        self,
        account: ServiceAccount,
        admin_email: str,
        get: Get,
        post: PostForm,
        clock: IReactorTime,
        directory: str = DIRECTORY,
    ) -> None:
        self._get = get
        self._clock = clock
        self._directory = directory.rstrip("/")
        self._tokens = AccessTokens(account, SCOPE, post, clock, subject=admin_email)
        self._cache: dict[str, tuple[tuple[str, ...], float]] = {}

    def drop_cache(self) -> int:
        dropped = len(self._cache)
        self._cache.clear()
        return dropped

    async def groups_of(self, email: str) -> tuple[str, ...]:
        """The group addresses EMAIL belongs to (directly), sorted."""
        now = self._clock.seconds()
        cached = self._cache.get(email.lower())
        if cached is not None and cached[1] > now:
            return cached[0]
        token = await self._tokens.get()
        found: set[str] = set()
        page = ""
        retried = False
        for _ in range(MAX_PAGES):
            query = {"userKey": email, "maxResults": "200"}
            if page:
                query["pageToken"] = page
            url = f"{self._directory}/groups?{urlencode(query)}"
            status, body = await self._get(url, {"Authorization": f"Bearer {token}"})
            if status == 401 and not retried:
                # Google dropped the access token early: get another, once.
                retried = True
                self._tokens.drop()
                token = await self._tokens.get()
                status, body = await self._get(url, {"Authorization": f"Bearer {token}"})
            if status != 200 or not isinstance(body, dict):
                raise Unavailable(f"Service Unavailable: Google's Directory API answered {status}")
            for group in body.get("groups") or []:
                if isinstance(group, dict) and isinstance(group.get("email"), str):
                    found.add(group["email"].lower())
            page = str(body.get("nextPageToken") or "")
            if not page:
                break
        groups = tuple(sorted(found))
        self._cache[email.lower()] = (groups, now + CACHE_SECONDS)
        return groups


class AccessTokens:
    """OAuth access tokens for a service account (RFC 7523 assertion signed with its key),
    each kept until a minute before it expires. SUBJECT: the person it acts as, if any."""

    def __init__(
        self,
        account: ServiceAccount,
        scope: str,
        post: PostForm,
        clock: IReactorTime,
        subject: str | None = None,
    ) -> None:
        self._account = account
        self._scope = scope
        self._post = post
        self._clock = clock
        self._subject = subject
        self._token: tuple[str, float] | None = None

    def drop(self) -> None:
        self._token = None

    async def get(self) -> str:
        now = self._clock.seconds()
        if self._token is not None and self._token[1] > now + 60:
            return self._token[0]
        assertion = service_account_assertion(self._account, self._scope, now, self._subject)
        status, body = await self._post(
            self._account.token_uri, {"grant_type": GRANT, "assertion": assertion}
        )
        self._token = granted(status, body, now)
        if self._token is None:
            why = (
                body.get("error_description") or body.get("error") if isinstance(body, dict) else ""
            )
            raise Unavailable(f"Service Unavailable: Google refused the service account: {why}")
        return self._token[0]


def granted(status: int, body: Any, now: float) -> tuple[str, float] | None:
    """The access token of a token endpoint's answer and when it expires; None if refused."""
    if status != 200 or not isinstance(body, dict) or "access_token" not in body:
        return None
    lifetime = body.get("expires_in", 3600)
    lifetime = float(lifetime) if isinstance(lifetime, int | float) else 3600.0
    return str(body["access_token"]), now + lifetime


def service_account_assertion(
    account: ServiceAccount, scope: str, now: float, subject: str | None = None
) -> str:
    """The signed JWT a service account trades for an access token (RFC 7523)."""
    claims: dict[str, Any] = {
        "iss": account.email,
        "scope": scope,
        "aud": account.token_uri,
        "iat": int(now),
        "exp": int(now) + 3600,
    }
    if subject:
        claims["sub"] = subject
    return jwt.encode(
        claims,
        account.private_key,
        algorithm="RS256",
        headers={"kid": account.key_id} if account.key_id else None,
    )
