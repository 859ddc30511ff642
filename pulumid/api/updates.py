"""The update lifecycle: create, start, status, lease, checkpoints, journal, events, end."""

from __future__ import annotations

import re
from typing import Any

from twisted.web.iweb import IRequest

from pulumid.api import shapes
from pulumid.api.base import BASE, KIND, STATUS, UPDATE, Routes, query, route
from pulumid.api.http import (
    json_response,
    no_content,
    parse_json,
    raw_json_response,
    read_body,
    read_wire,
)
from pulumid.auth.access import UPDATE_TOKEN, stack
from pulumid.auth.roles import Role
from pulumid.storage.records import StackRef, UpdateRecord


class UpdateRoutes(Routes):
    @route(
        f"{BASE}/{KIND}",
        "POST",
        stack(Role.WRITE, "update.create"),
        body=shapes.CREATE_UPDATE,
        answer=shapes.CREATED_UPDATE,
    )
    async def create_update(
        self, request: IRequest, org: str, project: str, stack: str, kind: str
    ) -> bytes:
        update_id = await self.backend.create_update(
            StackRef(org, project, stack), kind, await self._body(request)
        )
        return json_response(
            request, {"updateID": update_id, "requiredPolicies": [], "messages": []}
        )

    @route(UPDATE, "POST", stack(Role.WRITE, "update.start"), answer=shapes.STARTED_UPDATE)
    async def start_update(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        update = await self.backend.start_update(
            StackRef(org, project, stack),
            update_id,
            await self._body(request),
            _engine_version(request),
        )
        response: dict[str, Any] = {
            "version": update.version,
            "token": update.token,
            "tokenExpiration": int(update.lease_expires or 0),
        }
        if update.journal_version:
            response["journalVersion"] = update.journal_version
        return json_response(request, response)

    @route(UPDATE, "GET", stack(Role.READ), answer=shapes.UPDATE_STATUS)
    async def update_status(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        update = await self.backend.update_status(StackRef(org, project, stack), update_id)
        running = update.status in ("running", "not-started")
        view: dict[str, Any] = {
            "status": STATUS[update.status],
            "events": [],
            "continuationToken": "0" if running else None,
        }
        if update.failure:
            view["failure"] = update.failure
        return json_response(request, view)

    @route(
        f"{UPDATE}/renew_lease",
        "POST",
        UPDATE_TOKEN,
        body=shapes.RENEW_LEASE,
        answer=shapes.RENEWED_LEASE,
    )
    async def renew_lease(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        ref, token, _lease = await self._leased(request, org, project, stack, update_id)
        body = await self._body(request)
        expires = await self.backend.renew_lease(ref, update_id, token, body.get("duration", 300))
        return json_response(request, {"token": token, "tokenExpiration": int(expires)})

    # Update-token routes check the token (and the lease) before they read the body: a
    # wrong or stale token costs no decompression and no parsing.

    async def _leased(
        self, request: IRequest, org: str, project: str, stack: str, update_id: str
    ) -> tuple[StackRef, str, UpdateRecord]:
        ref, token = StackRef(org, project, stack), self._update_token(request)
        return ref, token, await self.backend.leased(ref, update_id, token)

    def _stored(self, kind: str, size: int) -> None:
        metrics = self.backend.metrics
        if metrics is not None:
            metrics.update_requests.labels(kind).inc()
            metrics.body_bytes.labels(kind).inc(size)

    @route(f"{UPDATE}/checkpoint", "PATCH", UPDATE_TOKEN, body=shapes.CHECKPOINT)
    async def checkpoint(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        ref, token, lease = await self._leased(request, org, project, stack, update_id)
        body = await read_body(request, self.cpu, self.config.max_body_size)
        await self.backend.checkpoint(ref, update_id, token, body, lease)
        self._stored("checkpoint", len(body))
        return no_content(request)

    @route(f"{UPDATE}/checkpointverbatim", "PATCH", UPDATE_TOKEN, body=shapes.VERBATIM)
    async def checkpoint_verbatim(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        ref, token, lease = await self._leased(request, org, project, stack, update_id)
        body = await read_body(request, self.cpu, self.config.max_body_size)
        await self.backend.checkpoint_verbatim(ref, update_id, token, body, lease)
        self._stored("verbatim", len(body))
        return no_content(request)

    @route(f"{UPDATE}/checkpointdelta", "PATCH", UPDATE_TOKEN, body=shapes.DELTA)
    async def checkpoint_delta(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        ref, token, lease = await self._leased(request, org, project, stack, update_id)
        wire, body = await read_wire(request, self.cpu, self.config.max_body_size)
        await self.backend.checkpoint_delta(ref, update_id, token, wire, body, lease)
        self._stored("delta", len(body))
        return no_content(request)

    @route(f"{UPDATE}/journalentries", "PATCH", UPDATE_TOKEN, body=shapes.JOURNAL)
    async def journal_entries(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        ref, token, lease = await self._leased(request, org, project, stack, update_id)
        wire, body = await read_wire(request, self.cpu, self.config.max_body_size)
        await self.backend.journal_entries(ref, update_id, token, wire, body, lease)
        self._stored("journal", len(body))
        return no_content(request)

    @route(f"{UPDATE}/events/batch", "POST", UPDATE_TOKEN, body=shapes.EVENT_BATCH)
    async def post_events(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        ref, token, lease = await self._leased(request, org, project, stack, update_id)
        raw = await read_body(request, self.cpu, self.config.max_body_size)
        body = await parse_json(raw, self.cpu)
        await self.backend.post_events(ref, update_id, token, body, lease, len(raw))
        self._stored("events", len(raw))
        return no_content(request)

    @route(f"{UPDATE}/events", "POST", UPDATE_TOKEN)
    async def post_event(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        ref, token, lease = await self._leased(request, org, project, stack, update_id)
        raw = await read_body(request, self.cpu, self.config.max_body_size)
        body = await parse_json(raw, self.cpu)
        await self.backend.post_events(ref, update_id, token, {"events": [body]}, lease, len(raw))
        return no_content(request)

    @route(f"{UPDATE}/events", "GET", stack(Role.READ), answer=shapes.EVENTS)
    async def get_events(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        events, token = await self.backend.get_events(
            StackRef(org, project, stack), update_id, query(request).get("continuationToken")
        )
        urn = query(request).get("urn")
        datas = [e.data for e in events]
        if urn:
            datas = [d for d in datas if urn.encode() in d]
        token_json = b"null" if token is None else b'"' + token.encode() + b'"'
        return raw_json_response(
            request,
            b'{"events":[' + b",".join(datas) + b'],"continuationToken":' + token_json + b"}",
        )

    @route(f"{UPDATE}/complete", "POST", UPDATE_TOKEN, body=shapes.COMPLETE)
    async def complete(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        ref, token = StackRef(org, project, stack), self._update_token(request)
        update = await self.backend.completing(ref, update_id, token)
        body = await self._body(request)
        await self.backend.complete(ref, update_id, token, body.get("status"), update)
        return no_content(request)

    @route(f"{UPDATE}/cancel", "POST", stack(Role.WRITE, "update.cancel"))
    async def cancel(
        self, request: IRequest, org: str, project: str, stack: str, kind: str, update_id: str
    ) -> bytes:
        await self.backend.cancel(StackRef(org, project, stack), update_id)
        return no_content(request)


_USER_AGENT = re.compile(r"^pulumi-cli/\d+ \(v?(\d+\.\d+\.\d+[^;)]*)")


def _engine_version(request: IRequest) -> str:
    """The CLI's version (from its User-Agent), as its engine writes it into manifests."""
    match = _USER_AGENT.match((request.getHeader("user-agent") or "").strip())
    return f"v{match.group(1)}" if match else ""
