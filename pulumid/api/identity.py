"""Who the caller is, and what this service offers: login, capabilities, registry stubs."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from pulumid.api import shapes
from pulumid.api.base import Routes, route
from pulumid.api.http import json_response
from pulumid.auth.access import PUBLIC, SIGNED_IN
from pulumid.auth.principal import Principal
from pulumid.auth.roles import Role
from pulumid.auth.service import Auth
from pulumid.engine.backend import Backend
from pulumid.errors import NotFound


class IdentityRoutes(Routes):
    def __init__(self, backend: Backend, auth: Auth) -> None:
        super().__init__(backend, auth)
        self._openapi: dict[str, Any] | None = None
        self.capability_list: list[dict[str, Any]] = [
            {"capability": "batch-encrypt", "version": 1},
            {
                "capability": "deployment-schema-version",
                "version": 1,
                "configuration": {"version": 4},
            },
        ]
        if self.config.delta_checkpoints:
            self.capability_list.append(
                {
                    "capability": "delta-checkpoint-uploads-v2",
                    "version": 2,
                    "configuration": {"checkpointCutoffSizeBytes": self.config.delta_cutoff},
                }
            )

    @route("/api/user", "GET", SIGNED_IN, answer=shapes.USER)
    def user(self, request: IRequest) -> bytes:
        caller = self.principal(request)
        orgs = self._organizations(caller)
        # An exchanged token shows as its organization (or team), as Pulumi Cloud's do.
        login = caller.name if caller.kind == "exchange" else caller.login
        body: dict[str, Any] = {
            "id": login,
            "githubLogin": login,
            "name": caller.name or caller.login,
            "email": caller.email,
            "avatarUrl": "",
            "organizations": [
                {"githubLogin": o, "name": o, "avatarUrl": "", "role": self._org_role(caller, o)}
                for o in orgs
            ],
            "identities": [],
            "siteAdmin": self.auth.multi_user and self.auth.access.policy.is_site_admin(caller),
            # Required by Pulumi Cloud's User schema; pulumid has no MFA or managed orgs.
            "hasMFA": False,
            "isOrgManaged": False,
            "isManagedByMultiOrg": False,
        }
        if caller.kind == "exchange":
            # `whoami -v` shows "Token type: organization: <org>" and the token's name.
            body["tokenInfo"] = {"name": caller.token_name, "organization": orgs[0] if orgs else ""}
        return json_response(request, body)

    def _org_role(self, caller: Principal, org: str) -> str:
        """Pulumi Cloud's organization roles: admin, or member for any other access."""
        if not self.auth.multi_user:
            return "admin"
        role = self.auth.access.policy.org_role(caller, org)
        return "admin" if role == Role.ADMIN else "member"

    def _organizations(self, caller: Principal) -> list[str]:
        if not self.auth.multi_user:
            return [self.config.organization]
        return self.auth.access.policy.organizations_of(caller)

    @route("/api/user/organizations/default", "GET", SIGNED_IN, answer=shapes.DEFAULT_ORG)
    def default_org(self, request: IRequest) -> bytes:
        orgs = self._organizations(self.principal(request))
        if not orgs:
            # 404 is "no opinion" to the CLI: it falls back to the user's login.
            raise NotFound("Not Found: you are not a member of any organization")
        return json_response(request, {"GitHubLogin": orgs[0], "Messages": []})

    @route("/api/capabilities", "GET", SIGNED_IN, answer=shapes.CAPABILITIES)
    def capabilities(self, request: IRequest) -> bytes:
        return json_response(request, {"capabilities": self.capability_list})

    @route("/api/openapi", "GET", PUBLIC)
    def openapi(self, request: IRequest) -> bytes:
        """This API's OpenAPI 3.1 description, generated from its routes."""
        if self._openapi is None:
            from pulumid.api.base import NEEDS, SHAPES, app
            from pulumid.api.openapi import document

            handlers = {name: getattr(type(self), name, None) for name in dir(type(self))}
            self._openapi = document(app, NEEDS, handlers, SHAPES)
        return json_response(request, self._openapi)

    @route("/api/registry/templates", "GET", SIGNED_IN)
    def templates(self, request: IRequest) -> bytes:
        return json_response(request, {"templates": []})

    @route("/api/registry/packages", "GET", SIGNED_IN)
    def packages(self, request: IRequest) -> bytes:
        return json_response(request, {"packages": []})
