"""Stacks: create, list, read, delete, rename, tags; export, import and update history."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from pulumid.api import shapes
from pulumid.api.base import BASE, STATUS, Routes, int_arg, query, route, version_arg
from pulumid.api.http import json_response, no_content, read_body
from pulumid.auth.access import SIGNED_IN, org, stack
from pulumid.auth.roles import Role
from pulumid.engine import deployments
from pulumid.errors import BadRequest, NotFound
from pulumid.storage.records import StackRecord, StackRef, UpdateRecord


class StackRoutes(Routes):
    @route("/api/user/stacks", "GET", SIGNED_IN, answer=shapes.STACKS)
    async def list_stacks(self, request: IRequest) -> bytes:
        args = query(request)
        caller = self.principal(request)
        access = self.auth.access
        stacks, token = await self.backend.list_stacks(
            args.get("organization"),
            args.get("project"),
            args.get("tagName"),
            args.get("tagValue"),
            args.get("continuationToken"),
            readable=access.policy.organizations_of(caller) if self.auth.multi_user else None,
        )
        # Stack rules may hide single stacks of a readable organization.
        visible = access.readable(caller, stacks)
        # No continuationToken at the last page (the CLI reads absent as null; Pulumi Cloud's
        # schema has it a string when present).
        page: dict[str, Any] = {"stacks": [self._summary(s) for s in visible]}
        if token is not None:
            page["continuationToken"] = token
        return json_response(request, page)

    def _summary(self, stack: StackRecord) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "id": f"{stack.org}/{stack.project}/{stack.name}",
            "orgName": stack.org,
            "projectName": stack.project,
            "stackName": stack.name,
        }
        if stack.locked_by:
            summary["lastUpdate"] = 0  # rendered by the CLI as "in progress"
        elif stack.last_update_time:
            summary["lastUpdate"] = stack.last_update_time
        if stack.resource_count is not None:
            summary["resourceCount"] = stack.resource_count
        return summary

    @route("/api/stacks/<org>/<project>", "HEAD", org(Role.READ))
    async def project_exists(self, request: IRequest, org: str, project: str) -> bytes:
        if not await self.backend.project_exists(org, project):
            raise NotFound(f"Not Found: project '{org}/{project}' not found")
        return b""

    @route(
        "/api/stacks/<org>/<project>",
        "POST",
        org(Role.WRITE, "stack.create"),
        body=shapes.CREATE_STACK,
    )
    async def create_stack(self, request: IRequest, org: str, project: str) -> bytes:
        await self.backend.create_stack(org, project, await self._body(request))
        return json_response(request, {})

    @route(BASE, "GET", stack(Role.READ), answer=shapes.STACK)
    async def get_stack(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        record = await self.backend.stack(StackRef(org, project, stack))
        view: dict[str, Any] = {
            "id": f"{record.org}/{record.project}/{record.name}",
            "orgName": record.org,
            "projectName": record.project,
            "stackName": record.name,
            "activeUpdate": record.locked_by or record.last_update or "",
            "tags": record.tags,
            "version": record.version,
        }
        if record.locked_by:
            update = await self.backend.store.get_update(record.locked_by)
            if update is not None:
                view["currentOperation"] = {
                    "kind": update.kind,
                    "author": update.requested_by,
                    "started": int(update.start_time or update.created),
                }
        return json_response(request, view)

    @route(BASE, "DELETE", stack(Role.ADMIN, "stack.delete"))
    async def delete_stack(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        force = query(request).get("force", "false").lower() == "true"
        await self.backend.delete_stack(StackRef(org, project, stack), force)
        return no_content(request)

    @route(f"{BASE}/rename", "POST", stack(Role.ADMIN, "stack.rename"))
    async def rename(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        body = await self._body(request)
        new_name, new_project = body.get("newName") or "", body.get("newProject") or ""
        if not isinstance(new_name, str) or not isinstance(new_project, str):
            raise BadRequest("Bad Request: 'newName' and 'newProject' must be strings")
        await self.backend.rename_stack(StackRef(org, project, stack), new_project, new_name)
        return no_content(request)

    @route(f"{BASE}/tags", "PATCH", stack(Role.WRITE, "stack.tags"))
    async def tags(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        await self.backend.set_tags(StackRef(org, project, stack), await self._body(request))
        return no_content(request)

    # -- export / import / history --------------------------------------------------------

    @route(f"{BASE}/export", "GET", stack(Role.READ))
    async def export(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        return await self._export(request, StackRef(org, project, stack), None)

    @route(f"{BASE}/export/<version>", "GET", stack(Role.READ))
    async def export_version(
        self, request: IRequest, org: str, project: str, stack: str, version: str
    ) -> bytes:
        return await self._export(request, StackRef(org, project, stack), version_arg(version))

    async def _export(self, request: IRequest, ref: StackRef, version: int | None) -> bytes:
        state = await self.backend.export(ref, version)
        request.setHeader(b"content-type", b"application/json")
        if b"gzip" in (request.getHeader(b"accept-encoding") or b""):
            request.setHeader(b"content-encoding", b"gzip")
            return state.gzipped
        return await self.cpu.run(deployments.gunzip_blocking, state.gzipped, 1 << 34)

    @route(f"{BASE}/import", "POST", stack(Role.WRITE, "stack.import"))
    async def import_(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        body = await read_body(request, self.cpu, self.config.max_body_size)
        update_id = await self.backend.import_state(StackRef(org, project, stack), body)
        return json_response(request, {"updateId": update_id})

    @route(f"{BASE}/updates", "GET", stack(Role.READ), answer=shapes.HISTORY)
    async def history(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        args = query(request)
        # Pulumi Cloud: page 0 (or none) is every entry; pageSize counts only with a page.
        page, size = int_arg(args.get("page", "0")), int_arg(args.get("pageSize", "10"))
        updates = await self.backend.history(StackRef(org, project, stack), page, size)
        return json_response(request, {"updates": [self._info(u) for u in updates]})

    @route(f"{BASE}/updates/latest", "GET", stack(Role.READ), answer=shapes.UPDATE_INFO)
    async def latest(self, request: IRequest, org: str, project: str, stack: str) -> bytes:
        ref = StackRef(org, project, stack)
        update = await self.backend.latest(ref)
        return json_response(request, await self._update_info(ref, update))

    @route(f"{BASE}/updates/<version>", "GET", stack(Role.READ), answer=shapes.UPDATE_INFO)
    async def update_by_version(
        self, request: IRequest, org: str, project: str, stack: str, version: str
    ) -> bytes:
        ref = StackRef(org, project, stack)
        update = await self.backend.update_by_version(ref, version_arg(version))
        return json_response(request, await self._update_info(ref, update))

    @route(f"{BASE}/updates/<version>/summary", "GET", stack(Role.READ))
    async def update_summary(
        self, request: IRequest, org: str, project: str, stack: str, version: str
    ) -> bytes:
        ref = StackRef(org, project, stack)
        update = await self.backend.update_by_version(ref, version_arg(version))
        info = self._info(update)
        summary = {
            "result": info["result"],
            "startTime": info["startTime"],
            "endTime": info.get("endTime", 0),
            "resourceCount": info.get("resourceCount", 0),
        }
        return json_response(request, summary)

    async def _update_info(self, ref: StackRef, update: UpdateRecord) -> dict[str, Any]:
        """Pulumi Cloud's UpdateInfo: the history entry and who asked for it."""
        stack = await self.backend.stack(ref)
        user = update.requested_by or self.config.user
        return {
            "info": self._info(update),
            "updateID": update.id,
            "version": update.version,
            "latestVersion": stack.version,
            "requestedBy": {"name": user, "githubLogin": user, "avatarUrl": ""},
        }

    @staticmethod
    def _info(update: UpdateRecord) -> dict[str, Any]:
        result = STATUS[update.status]
        if result == "running":
            result = "in-progress"
        info: dict[str, Any] = {
            "updateID": update.id,
            "kind": "preview" if update.dry_run else update.kind,
            "startTime": int(update.start_time or update.created),
            "message": str(update.metadata.get("message") or ""),
            "environment": update.metadata.get("environment") or {},
            "config": update.config,
            "result": result,
            "version": update.version,
            "resourceChanges": update.resource_changes or {},
        }
        if update.end_time:
            info["endTime"] = int(update.end_time)
        if update.failure:
            info["failure"] = update.failure  # why the server ended it (not a CLI field)
        return info
