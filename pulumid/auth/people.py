"""People who sign in through a provider: recording them, minting their CLI tokens, and the
scheduled re-check that disables those the provider no longer vouches for."""

from __future__ import annotations

import secrets
from dataclasses import replace

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pulumid.auth.authn import Authenticator
from pulumid.auth.google import WorkspaceGroups
from pulumid.auth.oidc import OIDCClient, Revoked, Sealer, SignIn
from pulumid.auth.tokens import hash_token, new_token
from pulumid.errors import PulumidError
from pulumid.ops.audit import AuditTrail
from pulumid.secrets.crypto import DecryptionError
from pulumid.storage.interface import Store
from pulumid.storage.records import IdentityRecord, TokenRecord

DAY = 86400.0

log = Logger()


class People:
    def __init__(
        self,
        client: OIDCClient,
        store: Store,
        clock: IReactorTime,
        sealer: Sealer,
        authenticator: Authenticator,
        audit: AuditTrail,
        token_days: float,
        node: str,
        workspace: WorkspaceGroups | None = None,
    ) -> None:
        self.client = client
        self._store = store
        self._clock = clock
        self._sealer = sealer
        self._authenticator = authenticator
        self._audit = audit
        self._token_days = token_days
        self._node = node
        self.workspace = workspace

    async def with_groups(self, sign_in: SignIn) -> SignIn:
        """The sign-in with the person's Workspace groups (google mode) in place of the
        ID token's (Google's carry none)."""
        if self.workspace is None:
            return sign_in
        return replace(sign_in, groups=await self.workspace.groups_of(sign_in.email))

    async def signed_in(self, sign_in: SignIn) -> str:
        """Record the person (again) and mint the token the CLI will hold; returns it.
        SIGN_IN carries the groups that decide (see with_groups)."""
        now = self._clock.seconds()
        known = await self._store.get_identity(sign_in.login)
        refresh = (
            self._sealer.seal_bytes(sign_in.refresh_token.encode(), sign_in.login.encode())
            if sign_in.refresh_token
            else None
        )
        await self._store.put_identity(
            IdentityRecord(
                login=sign_in.login,
                name=sign_in.name,
                email=sign_in.email,
                groups=sign_in.groups,
                provider=self.client.settings.mode,
                created=known.created if known else now,
                checked=now,
                refresh_token=refresh,
                disabled=False,
            )
        )
        self._authenticator.forget_login(sign_in.login)
        value = "pul-" + new_token()
        await self._store.create_token(
            TokenRecord(
                id=secrets.token_hex(16),
                token_hash=hash_token(value),
                login=sign_in.login,
                kind="cli",
                description=sign_in.cli.description[:200] or "pulumi login",
                created=now,
                expires=now + self._token_days * DAY,
            )
        )
        return value

    async def refresh_groups(self) -> int:
        """Read every Workspace person's groups again now (after the cache was dropped)."""
        if self.workspace is None:
            return 0
        changed = 0
        for person in await self._store.list_identities():
            if person.disabled or person.provider != "google" or not person.email:
                continue
            groups = await self.workspace.groups_of(person.email)
            if groups != person.groups:
                await self._store.put_identity(replace(person, groups=groups))
                self._authenticator.forget_login(person.login)
                changed += 1
        return changed

    async def recheck(self) -> int:
        """Ask the provider about everyone due; returns how many were disabled."""
        now = self._clock.seconds()
        interval = self.client.settings.oidc_recheck_interval
        if not await self._store.claim("oidc-recheck", self._node, now, now + interval * 0.9):
            return 0
        disabled = 0
        for person in await self._store.list_identities():
            if person.disabled or person.provider != self.client.settings.mode:
                continue
            if person.refresh_token is None or person.checked > now - interval * 0.9:
                continue
            try:
                if not await self._recheck(person, now):
                    disabled += 1
            except PulumidError as e:
                log.warn("could not re-check {login}: {error}", login=person.login, error=e)
        return disabled

    async def _recheck(self, person: IdentityRecord, now: float) -> bool:
        assert person.refresh_token is not None
        try:
            refresh = self._sealer.open_bytes(person.refresh_token, person.login.encode()).decode()
        except DecryptionError:
            log.warn(
                "the refresh token of {login} cannot be read: sign in again", login=person.login
            )
            return True
        try:
            claims, rotated = await self.client.refresh(refresh)
        except Revoked as e:
            await self._store.put_identity(replace(person, disabled=True, checked=now))
            self._authenticator.forget_login(person.login)
            self._audit.record("", person.login, "user.disabled", person.login, 401, "", str(e))
            log.info("{login} was disabled: the provider refused their refresh", login=person.login)
            return False
        groups = person.groups
        if self.workspace is not None:
            groups = await self.workspace.groups_of(person.email)
        elif claims is not None:
            _login, _name, _email, groups = self.client.identity(claims)
        sealed = person.refresh_token
        if rotated:
            sealed = self._sealer.seal_bytes(rotated.encode(), person.login.encode())
        await self._store.put_identity(
            replace(person, groups=groups, checked=now, refresh_token=sealed)
        )
        if groups != person.groups:
            self._authenticator.forget_login(person.login)
        return True
