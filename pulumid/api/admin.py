"""Site administration: backups (take one now, list them) and the secrets keys (which key
wraps how many stacks' data keys; rotate now rather than at the next tick)."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from pulumid.api import shapes
from pulumid.api.base import Routes, route
from pulumid.api.http import json_response
from pulumid.auth.access import site_admin
from pulumid.errors import NotFound, Unavailable


class AdminRoutes(Routes):
    @route("/api/admin/backups", "POST", site_admin("backup.create"), answer=shapes.BACKUP_TAKEN)
    async def take_backup(self, request: IRequest) -> bytes:
        backups = self._backups()
        try:
            outcome = await backups.run()
        except Exception as e:  # the snapshot itself failed: nothing was stored anywhere
            raise Unavailable(f"Service Unavailable: the backup failed: {e}") from None
        if not outcome.stored:
            failed = "; ".join(f"{k}: {v}" for k, v in outcome.failed.items())
            raise Unavailable(f"Service Unavailable: no destination took the backup: {failed}")
        return json_response(
            request,
            {"backup": outcome.manifest, "stored": outcome.stored, "failed": outcome.failed},
            201,
        )

    @route("/api/admin/backups", "GET", site_admin(), answer=shapes.BACKUPS)
    async def list_backups(self, request: IRequest) -> bytes:
        backups = self._backups()
        try:
            found = await backups.list()
        except Exception as e:
            raise Unavailable(f"Service Unavailable: listing backups failed: {e}") from None
        return json_response(request, {"backups": found})

    def _backups(self) -> Any:
        backups = self.backend.backups
        if backups is None:
            raise NotFound("Not Found: no backup destination is configured (--backup-to)")
        return backups

    @route("/api/admin/keys", "GET", site_admin(), answer=shapes.KEYS)
    async def keys(self, request: IRequest) -> bytes:
        counts = await self.backend.store.count_stack_keys()
        return json_response(request, _keys_view(self.backend, counts))

    @route("/api/admin/keys/rotate", "POST", site_admin("keys.rotate"), answer=shapes.KEYS)
    async def rotate(self, request: IRequest) -> bytes:
        await self.backend.rotation.tick()
        counts = await self.backend.store.count_stack_keys()
        return json_response(request, _keys_view(self.backend, counts))


def _keys_view(backend: Any, counts: dict[str, int]) -> dict[str, Any]:
    keyring = backend.secrets.keyring
    primary = keyring.primary.key_id
    ids = sorted(set(keyring.keys) | {k for k, n in counts.items() if n})
    last = backend.rotation.last
    return {
        "primary": primary,
        "lastRotation": None
        if last is None
        else {"rewrapped": last.rewrapped, "skipped": last.skipped, "seconds": last.seconds},
        "keys": [
            {
                "keyId": key_id,
                "stacks": counts.get(key_id, 0),
                "configured": key_id in keyring.keys,
                "primary": key_id == primary,
            }
            for key_id in ids
        ],
    }
