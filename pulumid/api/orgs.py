"""Organizations as the RBAC file describes them (members, teams, roles), and the audit log."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from twisted.web.iweb import IRequest

from pulumid.api import shapes
from pulumid.api.base import Routes, int_arg, query, route
from pulumid.api.http import json_response
from pulumid.auth.access import org, site_admin
from pulumid.auth.rbac import Grants
from pulumid.auth.roles import Role
from pulumid.errors import BadRequest, NotFound
from pulumid.storage.records import AuditRecord

AUDIT_PAGE = 100
_EPOCH = "1970-01-01T00:00:00Z"

# Pulumi Cloud knows member/admin; pulumid's four roles map onto the two (read/write: member).
_BUILT_IN = {"member": Role.WRITE, "admin": Role.ADMIN}


class OrgRoutes(Routes):
    def _grants(self, name: str) -> Grants:
        entry = self.auth.access.policy.organizations.get(name)
        if entry is None and self.auth.multi_user:
            raise NotFound(f"Not Found: organization '{name}' not found")
        return entry.grants if entry else Grants(users={self.config.user: Role.ADMIN})

    @route("/api/orgs/<org>/members", "GET", org(Role.READ), answer=shapes.MEMBERS)
    def members(self, request: IRequest, org: str) -> bytes:
        grants = self._grants(org)
        members = [
            {
                "role": "admin" if role == Role.ADMIN else "member",
                "fgaRole": {"id": role.label, "name": role.label, "modifiedAt": _EPOCH},
                "user": {"name": login, "githubLogin": login, "avatarUrl": ""},
                "created": _EPOCH,
                "knownToPulumi": True,
                "virtualAdmin": False,
            }
            for login, role in sorted(grants.users.items())
            if role > Role.NONE
        ]
        return json_response(request, {"members": members})

    @route("/api/orgs/<org>/teams", "GET", org(Role.READ), answer=shapes.TEAMS)
    def teams(self, request: IRequest, org: str) -> bytes:
        grants = self._grants(org)
        teams = [
            {
                "kind": "pulumi",
                "name": group,
                "displayName": group,
                "description": f"identity-provider group {group}: {role.label}",
                "userRole": role.label,
            }
            for group, role in sorted(grants.groups.items())
        ]
        return json_response(request, {"teams": teams})

    @route("/api/orgs/<org>/roles", "GET", org(Role.READ), answer=shapes.ROLES)
    def roles(self, request: IRequest, org: str) -> bytes:
        default = self._grants(org).default or Role.NONE
        roles = [
            {
                "id": role.label,
                "name": role.label,
                "description": f"pulumid built-in role {role.label}",
                "defaultIdentifier": role.label,
                "isOrgDefault": role == default,
                "orgId": org,
                "resourceType": "organization",
                "uxPurpose": "role",
                "created": _EPOCH,
                "modified": _EPOCH,
                "version": 1,
            }
            for role in Role
        ]
        return json_response(request, {"roles": roles})

    @route("/api/orgs/<org>/auditlogs", "GET", org(Role.ADMIN), answer=shapes.AUDIT_LOGS)
    async def audit_logs(self, request: IRequest, org: str) -> bytes:
        return await self._audit_page(request, org)

    @route("/api/admin/auditlogs", "GET", site_admin(), answer=shapes.AUDIT_LOGS)
    async def site_audit_logs(self, request: IRequest) -> bytes:
        """What belongs to no organization: sign-ins, tokens, refused exchanges."""
        return await self._audit_page(request, "")

    async def _audit_page(self, request: IRequest, org: str) -> bytes:
        args = query(request)
        before = int_arg(args["continuationToken"]) if args.get("continuationToken") else 0
        start = _time_arg(args.get("startTime"))
        end = _time_arg(args.get("endTime"))
        events = await self.backend.store.list_audit_events(
            org,
            start,
            end,
            args.get("userFilter") or None,
            args.get("eventFilter") or None,
            before,
            AUDIT_PAGE + 1,
        )
        body: dict[str, Any] = {"auditLogEvents": [_event(e) for e in events[:AUDIT_PAGE]]}
        if len(events) > AUDIT_PAGE:
            body["continuationToken"] = str(events[AUDIT_PAGE - 1].id)
        return json_response(request, body)


def _time_arg(value: str | None) -> float | None:
    if not value:
        return None
    number = int_arg(value)
    if number < 0:
        raise BadRequest("Bad Request: times are epoch seconds")
    return float(number)


def _event(event: AuditRecord) -> dict[str, Any]:
    return {
        "timestamp": int(event.time),
        "sourceIP": event.client_ip,
        "event": event.action,
        "description": event.description or f"{event.action} {event.resource} -> {event.status}",
        "user": {"name": event.actor, "githubLogin": event.actor, "avatarUrl": ""},
        "authFailure": event.auth_failure,
        "resource": event.resource,
        "status": event.status,
        "time": datetime.fromtimestamp(event.time, UTC).isoformat().replace("+00:00", "Z"),
    }
