"""Who the caller is, and what this service offers: login, capabilities, registry stubs."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from pulumid.api.base import Routes, app
from pulumid.api.http import json_response
from pulumid.engine.backend import Backend


class IdentityRoutes(Routes):
    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
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

    @app.route("/api/user", methods=["GET"])
    def user(self, request: IRequest) -> bytes:
        self._user(request)
        org, user = self.config.organization, self.config.user
        return json_response(
            request,
            {
                "id": user,
                "githubLogin": user,
                "name": user,
                "email": "",
                "avatarUrl": "",
                "organizations": [{"githubLogin": org, "name": org, "avatarUrl": ""}],
                "identities": [],
                "siteAdmin": False,
            },
        )

    @app.route("/api/user/organizations/default", methods=["GET"])
    def default_org(self, request: IRequest) -> bytes:
        self._user(request)
        return json_response(request, {"GitHubLogin": self.config.organization, "Messages": []})

    @app.route("/api/capabilities", methods=["GET"])
    def capabilities(self, request: IRequest) -> bytes:
        self._user(request)
        return json_response(request, {"capabilities": self.capability_list})

    @app.route("/api/registry/templates", methods=["GET"])
    def templates(self, request: IRequest) -> bytes:
        self._user(request)
        return json_response(request, {"templates": [], "continuationToken": None})

    @app.route("/api/registry/packages", methods=["GET"])
    def packages(self, request: IRequest) -> bytes:
        self._user(request)
        return json_response(request, {"packages": [], "continuationToken": None})
